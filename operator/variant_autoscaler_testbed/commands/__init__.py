"""Sub-commands of `variant-autoscaler` that need the testbed (emulate-server); cli.py lists them where
this package is installed (a dev install, the `testbed` image), never in the operator image."""
