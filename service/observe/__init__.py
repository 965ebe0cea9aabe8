"""Observability: Prometheus metrics and logging."""
