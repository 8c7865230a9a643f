#!/usr/bin/env bash
# Install Debian's Slurm + munge (and OpenSSH, for horovodrun across the two test nodes)
# for the test cluster (tests/slurm), if missing.
# Needs root (apt-get, no interaction). Nothing is configured in /etc: the tests write
# their own slurm.conf in a temporary folder (tests/clusters/testcluster.py).
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge openssh-server openssh-client)
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null && [[ -x /usr/sbin/sshd ]] && command -v ssh >/dev/null; then
    echo "install_slurm: $(slurmctld -V), munge and OpenSSH already installed"
    exit 0
fi
if [[ $(id -u) != 0 ]]; then
    echo "install_slurm: ERROR: the Slurm tests need ${PKGS[*]} and installing them needs root;" \
         "run 'sudo apt-get install ${PKGS[*]}' (or HVDTRAIN_SKIP_SLURM=1 make test to leave them out)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
echo "install_slurm: installed $(slurmctld -V)"
