"""The local executor: runs a plan on this machine as processes (forked from a preloaded
trainer), with a live display."""
