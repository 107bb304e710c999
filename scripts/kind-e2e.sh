#!/usr/bin/env bash
# End-to-end check on a local kind cluster, for users with Docker (`make kind-e2e`). NOT run in CI
# here: no Docker engine or node images are available on the machines this project is tested on; the
# same path is covered there by the emulated cluster (tests/test_rbac.py runs the operator as the
# chart configures it and watches it scale).
#
# What it does:
#   1. creates a kind cluster (or reuses it), builds the operator image and the testbed image (the
#      Dockerfile's `testbed` target: operator + emulated vLLM servers and load generator) and loads both;
#   2. installs a minimal Prometheus (deploy/prometheus/in-cluster-prometheus.yaml);
#   3. `helm install`s the chart with that Prometheus and a short interval;
#   4. applies the sample fleet (deploy/samples: emulated vLLM servers + VariantAutoscalings);
#   5. sends load to one model and waits until the operator scales it up; prints the decisions.
#
# Needs: docker, kind, kubectl, helm (bin/helm from `make system-deps` works). Environment:
#   IMAGE=variant-autoscaler:<appVersion>  TESTBED_IMAGE=variant-autoscaler-testbed:<appVersion>
#   CLUSTER=variant-autoscaler-e2e  KEEP_CLUSTER=1 (keep it)
#   LOAD_RPS=40  TIMEOUT_S=600
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER="${CLUSTER:-variant-autoscaler-e2e}"
APP_VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' charts/variant-autoscaler/Chart.yaml)"
IMAGE="${IMAGE:-variant-autoscaler:${APP_VERSION}}"
TESTBED_IMAGE="${TESTBED_IMAGE:-variant-autoscaler-testbed:${APP_VERSION}}"
LOAD_RPS="${LOAD_RPS:-40}"
TIMEOUT_S="${TIMEOUT_S:-600}"
HELM="${HELM:-$( [ -x bin/helm ] && echo bin/helm || echo helm )}"
SAMPLES_NS=llm-serving
MODEL=meta-llama/Llama-3.1-8B-Instruct

say() { printf '\n==> %s\n' "$*"; }
need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 not found on PATH ($2)" >&2; exit 2; }; }
need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
command -v "$HELM" >/dev/null 2>&1 || { echo "error: helm not found: run 'make system-deps' or install helm 3" >&2; exit 2; }

cleanup() {
  if [ "${KEEP_CLUSTER:-0}" != "1" ]; then
    say "deleting kind cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" || true
  fi
}
trap cleanup EXIT

say "kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

say "images $IMAGE and $TESTBED_IMAGE"
docker build -t "$IMAGE" .
docker build --target testbed -t "$TESTBED_IMAGE" .
kind load docker-image "$IMAGE" "$TESTBED_IMAGE" --name "$CLUSTER"

say "Prometheus (deploy/prometheus/in-cluster-prometheus.yaml)"
kubectl apply -f deploy/prometheus/in-cluster-prometheus.yaml
kubectl -n monitoring rollout status deploy/prometheus --timeout=300s

say "helm install (CRDs from the chart)"
"$HELM" upgrade --install variant-autoscaler charts/variant-autoscaler \
  --namespace variant-autoscaler --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  --set prometheus.url=http://prometheus.monitoring.svc:9090 \
  --set operator.intervalSeconds=10 --set operator.scaleDownStabilizationSeconds=120 \
  --wait --timeout 300s

say "sample fleet (deploy/samples)"
# The sample model servers run the testbed image: point them at the image just loaded.
kubectl kustomize deploy/samples | sed "s#image: variant-autoscaler-testbed:${APP_VERSION}#image: ${TESTBED_IMAGE}#" | kubectl apply -f -
kubectl -n "$SAMPLES_NS" wait --for=condition=Available deploy --all --timeout=300s

replicas_of_model() {
  kubectl -n "$SAMPLES_NS" get deploy -l app.kubernetes.io/name=llama-8b -o jsonpath='{range .items[*]}{.spec.replicas}{"\n"}{end}' \
    | awk '{s += $1} END {print s + 0}'
}
before="$(replicas_of_model)"
say "load: ${LOAD_RPS} req/s to $MODEL (replicas of its variants now: $before)"
kubectl -n "$SAMPLES_NS" delete job load --ignore-not-found
kubectl -n "$SAMPLES_NS" apply -f - <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: load
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      securityContext: {runAsNonRoot: true, runAsUser: 65532}
      containers:
        - name: load
          image: ${TESTBED_IMAGE}
          command: ["python", "-c"]
          args:
            - |
              import asyncio
              from variant_autoscaler_testbed.load import LengthClass, LoadSpec, RatePhase, generate_load
              spec = LoadSpec(targets=["http://llama-8b.${SAMPLES_NS}:8000"], model="${MODEL}",
                              phases=[RatePhase(duration_s=${TIMEOUT_S}, rate_rps=${LOAD_RPS})],
                              mix=[LengthClass(prompt_tokens=1024, max_tokens=256)],
                              max_requests=1000000, max_duration_s=${TIMEOUT_S} + 60)
              print(asyncio.run(generate_load(spec)).model_dump_json())
EOF

say "waiting up to ${TIMEOUT_S}s for a scale-up of $MODEL"
deadline=$(( $(date +%s) + TIMEOUT_S ))
while :; do
  now="$(replicas_of_model)"
  if [ "$now" -gt "$before" ]; then
    say "scaled up: $before -> $now replicas"
    kubectl -n "$SAMPLES_NS" get variantautoscalings -o wide
    kubectl -n "$SAMPLES_NS" get events --field-selector reason=ScaledUp
    echo "kind-e2e: PASS"
    exit 0
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    echo "kind-e2e: FAIL: no scale-up within ${TIMEOUT_S}s" >&2
    kubectl -n "$SAMPLES_NS" get variantautoscalings -o wide >&2 || true
    kubectl -n variant-autoscaler logs deploy/variant-autoscaler --tail=100 >&2 || true
    exit 1
  fi
  sleep 10
done
