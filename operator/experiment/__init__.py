"""The experiment core: the spec (desired state), the plan (its runs as a DAG) and their estimates. Pure."""
