{{/*
The API calls the operator makes, as RBAC rules: nothing more. tests/test_rbac.py runs the operator
against the emulated cluster, derives (apiGroup, resource, verb) from the requests it really makes
and compares them with these rules exactly, so a new API call without a rule, or a rule nothing
uses, fails the test.
*/}}

{{/* Rules for namespaced resources: in the ClusterRole (all namespaces) or a Role per watched namespace. */}}
{{- define "variant-autoscaler.rules.namespaced" -}}
- apiGroups: ["autoscaling.variant-autoscaler.io"]
  resources: ["variantautoscalings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["autoscaling.variant-autoscaler.io"]
  resources: ["variantautoscalings/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* kopf peering when the operator watches all namespaces: one cluster-scoped peering object. */}}
{{- define "variant-autoscaler.rules.clusterPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* kopf peering when the operator watches some namespaces: a KopfPeering in each of them. */}}
{{- define "variant-autoscaler.rules.namespacedPeering" -}}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* Cluster-scoped reads kopf needs to serve all namespaces (it follows namespaces coming and going). */}}
{{- define "variant-autoscaler.rules.clusterWide" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
