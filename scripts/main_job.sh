#!/usr/bin/env bash
# The main job: builds meshtrain (installing what it needs when run as root) and trains a
# small GPT (6 layers, width 384, byte vocabulary) on the built-in corpus, Debian's fortune
# cookies, for a few minutes on the CPU, ending with generated text. Extra arguments go to
# `meshtrain train` (e.g. --set train.steps=1000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh cpu
exec build/cpu/launch/meshtrain train --set run.dir=runs/main "$@"
