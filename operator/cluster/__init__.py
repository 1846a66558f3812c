"""The Kubernetes side: render Jobs, reconcile desired vs observed, the CRD, status, and the controller."""
