#!/usr/bin/env bash
# Installs the system packages the cluster tests use: SLURM (slurmctld, slurmd, sbatch),
# munge (its authentication), headless Chromium + chromedriver (the MLflow UI test), and ss/ps/pgrep
# (iproute2, procps: the tests check what listens where and that nothing outlives them).
# Idempotent: does nothing when every package is already installed. Debian/Ubuntu, as root
# (or with sudo). CI calls it before `make test`; users only need it to run those tests.
set -euo pipefail

PACKAGES=(slurm-wlm munge chromium chromium-driver iproute2 procps)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-system-deps: all installed (${PACKAGES[*]})"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

echo "install-system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: no mail server, no docs; the daemons are started by the tests
# themselves (never by the package's init scripts: policy-rc.d is not touched, and on a
# machine without systemd nothing is started anyway).
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-system-deps: done"
