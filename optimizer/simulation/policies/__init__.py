"""Autoscaling policies, all behind the `optimizer.simulation.policy.Policy` interface."""
