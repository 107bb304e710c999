"""Stand-ins for the parts of a real cluster that cannot run on a developer machine or in CI.

Kubernetes here is half real: custom resources live on the real CRD API server
(`crd_server`, k8s.io/apiextensions-apiserver on etcd), while the built-in types the operator
touches (Namespaces, ConfigMaps, Pods, Events, Deployments with their scale subresource) live on an
emulated core API (`core_api`) that also puts both behind one URL. An emulated kubelet (`kubelet`)
turns Deployment replicas into Pods. `cluster.EmulatedCluster` starts all of it; tests and
`make live` use the same code. Submodules are imported explicitly, so importing this package has no
side effects.
"""
