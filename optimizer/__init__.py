"""The decision engine of variant-autoscaler.

Pure Python: no Kubernetes, no HTTP. Observations and configuration come in as pydantic models,
decisions go out as pydantic models; everything in between is deterministic.
"""
