#!/usr/bin/env bash
# Data-parallel weak scaling and overlap: the default model (gpt-small, bf16, batch 8 x 128 per
# rank) on 1 rank, then 2 ranks with overlap on and off, one thread per rank. Prints the median
# step time, tokens/s (global), the communication wait and the hidden share, from metrics.jsonl.
#   bench/bench_dp.sh [path/to/meshtrain] [steps]
set -euo pipefail
MT=${1:-build/cpu/launch/meshtrain}
STEPS=${2:-15}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
COMMON=(--quiet --set "train.steps=$STEPS" --set train.threads=1 --set sample.tokens=0
        --set eval.every=0)
"$MT" train "${COMMON[@]}" --set "run.dir=$OUT/np1" > /dev/null
mpirun -np 2 --bind-to core "$MT" train "${COMMON[@]}" --set "run.dir=$OUT/np2_on" > /dev/null
mpirun -np 2 --bind-to core "$MT" train "${COMMON[@]}" --set dp.overlap=off \
  --set "run.dir=$OUT/np2_off" > /dev/null
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
base = None
print("| run | ms/step | tokens/s (global) | weak-scaling eff. | comm wait ms | hidden |")
print("| --- | --- | --- | --- | --- | --- |")
for name in ["np1", "np2_on", "np2_off"]:
    rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    st = [r for r in rows if "ms" in r][2:]          # the first steps warm up
    cm = [r for r in rows if "comm_wait_ms" in r][2:]
    ms = statistics.median(r["ms"] for r in st)
    base = base or ms
    wait = statistics.mean(r["comm_wait_ms"] for r in cm) if cm else 0.0
    hid = statistics.mean(r["comm_hidden"] for r in cm) if cm else 0.0
    tps = statistics.median(r["tokens_per_s"] for r in st)
    print(f"| {name} | {ms:.0f} | {tps:.0f} | {100 * base / ms:.0f}% | {wait:.1f} | {100 * hid:.0f}% |")
PY
