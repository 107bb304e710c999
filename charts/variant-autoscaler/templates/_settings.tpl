{{/*
The operator's settings file (OperatorSettings in operator/variant_autoscaler/settings.py, snake_case
keys), built from the chart values as one dict so that quoting is toYaml's job. tests/test_packaging_chart.py
parses the rendered file with the operator's own parser for default and non-default values.
*/}}
{{- define "variant-autoscaler.settings" -}}
{{- $op := .Values.operator -}}
{{- if and $op.annotationMode (ne $op.actuationMode "metrics") }}
{{- fail "operator.annotationMode needs operator.actuationMode=metrics: KEDA scales the targets of annotated ScaledObjects" }}
{{- end -}}
{{- $prom := dict "url" .Values.prometheus.url "timeout_s" .Values.prometheus.timeoutSeconds "verify_tls" .Values.prometheus.tls.verify -}}
{{- with (include "variant-autoscaler.caFile" .) }}{{ $_ := set $prom "ca_file" . }}{{ end -}}
{{- with (include "variant-autoscaler.tokenFile" .) }}{{ $_ := set $prom "bearer_token_file" . }}{{ end -}}
{{- with .Values.prometheus.headers }}{{ $_ := set $prom "headers" . }}{{ end -}}
{{- $accs := list -}}
{{- range .Values.accelerators -}}
{{- $a := dict "name" .name "cost_per_hour" .costPerHour -}}
{{- if not (kindIs "invalid" .available) }}{{ $_ := set $a "available" .available }}{{ end -}}
{{- with .memoryGB }}{{ $_ := set $a "memory_gb" . }}{{ end -}}
{{- with .productLabels }}{{ $_ := set $a "product_labels" . }}{{ end -}}
{{- $accs = append $accs $a -}}
{{- end -}}
{{- $s := dict
  "interval_s" $op.intervalSeconds
  "actuation_mode" $op.actuationMode
  "watched_namespaces" $op.watchNamespaces
  "prometheus" $prom
  "accelerators" $accs
  "discover_inventory" $op.discoverInventory
  "annotation_mode" $op.annotationMode
  "scale_up_window_s" $op.scaleUpStabilizationSeconds
  "scale_down_window_s" $op.scaleDownStabilizationSeconds
  "change_penalty" $op.changePenaltyPerReplica
  "kv_transfer_gb_s" $op.kvTransferGBps
  "staleness_threshold_s" $op.stalenessThresholdSeconds
  "rate_window_s" $op.rateWindowSeconds
  "service_level" $op.serviceLevel
  "forecast" $op.forecast
  "forecast_lead_time_s" $op.forecastLeadTimeSeconds
  "forecast_error_z" $op.forecastErrorZ
-}}
{{- if $op.maxChangePerCycle }}{{ $_ := set $s "max_change_per_cycle" $op.maxChangePerCycle }}{{ end -}}
{{- with $op.defaultSLO -}}
{{- $slo := dict "ttft_s" .ttftSeconds "itl_s" .itlSeconds -}}
{{- with .e2eSeconds }}{{ $_ := set $slo "e2e_s" . }}{{ end -}}
{{- with .percentile }}{{ $_ := set $slo "percentile" . }}{{ end -}}
{{- $_ := set $s "default_slo" $slo -}}
{{- end -}}
{{- with $op.models }}{{ $_ := set $s "models" . }}{{ end -}}
{{- toYaml (mustMergeOverwrite $s (deepCopy $op.extraSettings)) -}}
{{- end }}
