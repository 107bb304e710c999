#!/usr/bin/env bash
# Installs the system packages the test suite needs, only where missing. Idempotent.
set -euo pipefail
need=()
# (filled in as tests that need real servers arrive)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
