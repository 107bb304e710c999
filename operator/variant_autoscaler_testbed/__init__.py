"""The testbed: stand-ins for the parts of a real cluster that cannot run on a developer machine or
in CI, and the live demo built from them. It tests and demonstrates the operator (`variant_autoscaler`)
and is no part of it: the operator package never imports it, and the operator image leaves it out
(the Dockerfile's `testbed` target adds it for the sample model servers).

Kubernetes here is half real: custom resources live on the real CRD API server
(`crd_server`, k8s.io/apiextensions-apiserver on etcd), while the built-in types the operator
touches (Namespaces, ConfigMaps, Pods, Events, Deployments with their scale subresource) live on an
emulated core API (`core_api`) that also puts both behind one URL. An emulated kubelet (`kubelet`)
turns Deployment replicas into Pods. `cluster.EmulatedCluster` starts all of it; tests and
`make live` (`live`) use the same code. Also here: emulated vLLM model servers and their pods
(`model_server`, `model_pods`, `vllm_metrics`), a load generator (`load`), a real-Prometheus harness
(`prometheus`), a fault-injecting proxy (`fault_proxy`) and the `emulate-server` command (`commands`). Submodules are imported explicitly, so importing this package has no
side effects.
"""
