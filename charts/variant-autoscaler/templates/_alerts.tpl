{{/*
Alert rule groups of the operator, in Prometheus's rule-file shape. The PrometheusRule template and
`make manifests` (deploy/prometheus/alerts.yaml, for Prometheus without the operator) render the same
groups. Every metric name here is checked against a live scrape of the exporter by
tests/test_dashboard.py, and the file is checked with promtool.
*/}}
{{- define "variant-autoscaler.alertGroups" -}}
{{- $stalled := int .Values.prometheusRule.stalledMinutes -}}
{{- $thrash := int .Values.prometheusRule.thrashChangesPerHour -}}
- name: variant-autoscaler
  rules:
    - alert: VariantAutoscalerOptimizationStalled
      expr: |
        (time() - max(variant_autoscaler_last_successful_cycle_timestamp_seconds) > {{ mul $stalled 60 }})
          and on () (max(variant_autoscaler_active) == 1)
      for: 1m
      labels:
        severity: critical
      annotations:
        summary: No successful optimization cycle for {{ $stalled }} minutes.
        description: >-
          The active variant-autoscaler replica last completed a cycle
          {{ "{{" }} $value | humanizeDuration {{ "}}" }} ago, so replicas no longer follow demand. Check the
          operator's logs and variant_autoscaler_cycle_errors_total by reason.
    - alert: VariantAutoscalerNoActiveReplica
      expr: |
        max(variant_autoscaler_active) == 0
      for: 5m
      labels:
        severity: critical
      annotations:
        summary: No variant-autoscaler replica runs the control loop.
        description: >-
          Every operator replica is passive (kopf peering), so no variant is being sized. Check the
          peering object and the operator pods.
    - alert: VariantAutoscalerCycleErrors
      expr: |
        sum by (reason) (increase(variant_autoscaler_cycle_errors_total[15m])) > 3
      for: 5m
      labels:
        severity: warning
      annotations:
        summary: 'Control cycles fail or degrade: {{ "{{" }} $labels.reason {{ "}}" }}.'
        description: >-
          {{ "{{" }} $value | humanize {{ "}}" }} cycles in 15 minutes ended with reason
          {{ "{{" }} $labels.reason {{ "}}" }}.
    - alert: VariantAutoscalerMetricsMissing
      expr: |
        max by (namespace, variant, model) (variant_autoscaler_metrics_available) == 0
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: 'No live vLLM metrics for {{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.variant {{ "}}" }}.'
        description: >-
          The operator could not collect metrics of model {{ "{{" }} $labels.model {{ "}}" }} for 10 minutes;
          it holds the variant's replicas (never scales down without metrics). Check the Prometheus
          URL and that Prometheus scrapes the vLLM pods (deploy/prometheus/scrape-vllm.yaml).
    - alert: VariantAutoscalerInventoryExhausted
      expr: |
        (max by (accelerator) (variant_autoscaler_inventory_in_use)
          >= max by (accelerator) (variant_autoscaler_inventory_available))
          and on () (sum(variant_autoscaler_unmet_demand_rps) > 0)
      for: 15m
      labels:
        severity: warning
      annotations:
        summary: 'All {{ "{{" }} $labels.accelerator {{ "}}" }} accelerators are in use and demand is unmet.'
        description: >-
          The decision uses every {{ "{{" }} $labels.accelerator {{ "}}" }} the inventory allows while some model's
          demand cannot be served at its SLO. Add accelerators or lower a model's priority.
    - alert: VariantAutoscalerDemandUnmet
      expr: |
        max by (model) (variant_autoscaler_unmet_demand_rps) > 0
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: 'Demand of {{ "{{" }} $labels.model {{ "}}" }} exceeds what the inventory can serve at SLO.'
        description: >-
          {{ "{{" }} $value | humanize {{ "}}" }} requests/s of {{ "{{" }} $labels.model {{ "}}" }} cannot be served within its
          latency SLO by the best allocation the inventory allows.
    - alert: VariantAutoscalerScalingThrash
      expr: |
        (sum by (namespace, variant) (increase(variant_autoscaler_scaling_actions_total[1h])) > {{ $thrash }})
          and on (namespace, variant)
        (count by (namespace, variant) (increase(variant_autoscaler_scaling_actions_total[1h]) > 0) >= 2)
      for: 5m
      labels:
        severity: warning
      annotations:
        summary: '{{ "{{" }} $labels.namespace {{ "}}" }}/{{ "{{" }} $labels.variant {{ "}}" }} scales up and down repeatedly.'
        description: >-
          More than {{ $thrash }} replica changes in both directions within an hour. Lengthen the
          scale-down stabilization window or raise the change penalty.
    - alert: VariantAutoscalerSLOAtRisk
      expr: |
        max by (model) (variant_autoscaler_model_normalized_load) > 1
      for: 10m
      labels:
        severity: warning
      annotations:
        summary: 'Model {{ "{{" }} $labels.model {{ "}}" }} runs above its capacity at SLO.'
        description: >-
          Demand is {{ "{{" }} $value | humanizePercentage {{ "}}" }} of what the ready replicas serve within the
          latency SLO; requests are likely to miss it until new replicas are ready.
{{- end }}
