"""MLflow tracking of one run, resilient to outages: the tracker, its buffer, sync and rebuild."""
