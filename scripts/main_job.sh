#!/usr/bin/env bash
# The main job: builds meshtrain (installing what it needs when run as root) and trains a
# small GPT (6 layers, width 384, byte vocabulary) on the built-in corpus, Debian's fortune
# cookies, for a few minutes on two data-parallel ranks (mpirun -np 2, one thread each: DP = 2,
# 8 sequences per rank and step), ending with generated text. Extra arguments go to
# `meshtrain train` (e.g. --set train.steps=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu
flags=(-np 2)
# Open MPI: allow two ranks on a one-core machine too, and running as root (containers, CI).
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  flags+=(--oversubscribe)
  [[ $(id -u) -eq 0 ]] && flags+=(--allow-run-as-root)
fi
exec mpirun "${flags[@]}" build/cpu/launch/meshtrain train --set run.dir=runs/main \
  --set train.threads=1 "$@"
