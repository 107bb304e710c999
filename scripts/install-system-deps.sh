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
