"""Discrete-event simulation of vLLM-style replicas, used to check the capacity model against."""
