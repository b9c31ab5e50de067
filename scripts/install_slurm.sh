#!/usr/bin/env bash
# Debian's Slurm (slurmctld, slurmd, the client commands) and munge, for the throw-away single-node
# cluster the Slurm tests start (tests/slurm_cluster.py). Needs root and Debian's package registry; a
# no-op when the commands are already there. Nothing is started or configured system-wide here.
set -euo pipefail
needed=(slurmctld slurmd sbatch squeue sinfo scontrol munged)
missing=0
for tool in "${needed[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing=1; done
[ "$missing" = 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: installing slurm-wlm and munge needs root (apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
for tool in "${needed[@]}"; do command -v "$tool" >/dev/null || { echo "install_slurm.sh: $tool still missing" >&2; exit 1; }; done
