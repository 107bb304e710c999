{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "variant-autoscaler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects: the release name when it already contains the chart name. */}}
{{- define "variant-autoscaler.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "variant-autoscaler.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "variant-autoscaler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "variant-autoscaler.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "variant-autoscaler.labels" -}}
helm.sh/chart: {{ include "variant-autoscaler.chart" . }}
{{ include "variant-autoscaler.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: variant-autoscaler
{{- end }}

{{- define "variant-autoscaler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "variant-autoscaler.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "variant-autoscaler.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* True (non-empty) when the operator serves every namespace. */}}
{{- define "variant-autoscaler.clusterWide" -}}
{{- if not .Values.operator.watchNamespaces }}true{{- end }}
{{- end }}

{{- define "variant-autoscaler.settingsName" -}}
{{- printf "%s-settings" (include "variant-autoscaler.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the Prometheus bearer token file is mounted, if any. */}}
{{- define "variant-autoscaler.tokenFile" -}}
{{- if .Values.prometheus.bearerToken.secretName -}}
/var/run/secrets/prometheus/token/{{ .Values.prometheus.bearerToken.secretKey }}
{{- else if .Values.prometheus.bearerToken.useServiceAccountToken -}}
/var/run/secrets/prometheus/sa-token/token
{{- end }}
{{- end }}

{{- define "variant-autoscaler.caFile" -}}
{{- if .Values.prometheus.tls.caSecret.name -}}
/var/run/secrets/prometheus/ca/{{ .Values.prometheus.tls.caSecret.key }}
{{- end }}
{{- end }}
