"""variant-autoscaler application: CLI, Kubernetes operator, Prometheus collector, exporter.

The decision engine lives in the `optimizer` package and has no Kubernetes or HTTP code;
everything with side effects lives here.
"""
