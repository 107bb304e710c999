"""Sub-commands of `variant-autoscaler`; each module is one command (see cli.py)."""
