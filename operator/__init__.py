"""xstilts.operator: turns an experiment spec into runs, and runs into local processes or
Kubernetes Jobs. Imports no torch."""
