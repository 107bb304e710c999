{{/*
The API calls the operator makes, as RBAC rules, and nothing more. tests/test_rbac.py runs the
operator (kopf and the control loop) against the emulated cluster with the arguments this chart
gives it, derives (apiGroup, resource, verb) from the requests it really makes, and compares them
with these rules exactly: a new API call without a rule, or a rule nothing uses, fails the test.
*/}}

{{/* Namespaced resources, in the ClusterRole (all namespaces) or in a Role per watched namespace. */}}
{{- define "variant-autoscaler.rules.namespaced" -}}
# kopf watches VariantAutoscalings; each cycle lists them and writes its decision to their status.
- apiGroups: ["autoscaling.variant-autoscaler.io"]
  resources: ["variantautoscalings"]
  verbs: ["list", "watch"]
- apiGroups: ["autoscaling.variant-autoscaler.io"]
  resources: ["variantautoscalings/status"]
  verbs: ["patch"]
# Targets: replicas and pods are read by listing; replicas are written through the scale subresource.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list"]
- apiGroups: ["apps"]
  resources: ["deployments/scale"]
  verbs: ["get", "update"]
{{- if .Values.rbac.statefulSets }}
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list"]
- apiGroups: ["apps"]
  resources: ["statefulsets/scale"]
  verbs: ["get", "update"]
{{- end }}
{{- if or (ne .Values.operator.actuationMode "metrics") .Values.operator.annotationMode }}
# Direct mode: HorizontalPodAutoscalers are listed so a target an HPA already scales is left to it
# (condition ConflictingAutoscaler) instead of fought over; annotation mode: HPAs marked llm-d.ai/managed.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list"]
{{- end }}
{{- if .Values.operator.annotationMode }}
# Annotation mode: ScaledObjects marked llm-d.ai/managed are listed each cycle (read only: KEDA owns them).
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["list"]
{{- end }}
# Pods: listed per target; annotated with controller.kubernetes.io/pod-deletion-cost before a scale-down.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "patch"]
# Profiles referenced by spec.profile.configMapRef (and the settings ConfigMap in all-namespaces mode).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* kopf peering: kopf lists, watches and patches the peering object; the operator reads it before
each cycle and creates it when missing. */}}
{{- define "variant-autoscaler.rules.peering" -}}
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["get", "list", "watch", "patch", "create"]
{{- end }}

{{/* All-namespaces mode: kopf follows CRDs to discover its resources. With watchNamespaces the operator
turns kopf's scanning off (it finds the CRD once through discovery, /apis, open to every authenticated
user, and takes the namespaces by name), so this mode needs neither CRDs nor Namespaces cluster-wide. */}}
{{- define "variant-autoscaler.rules.crds" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}

{{/* The one cluster-scoped read of every mode, only when asked for. */}}
{{- define "variant-autoscaler.rules.nodes" -}}
{{- if .Values.operator.discoverInventory }}
# Accelerator inventory from node labels and allocatable GPUs (operator.discoverInventory).
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
{{- end }}
{{- end }}
