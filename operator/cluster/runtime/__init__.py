"""The controller's runtime, fenced from the pure cluster logic: API client, lease, Prometheus metrics."""
