#!/usr/bin/env bash
# Tensor parallelism against data parallelism and one rank, for the same global batch, on the
# default small GPT (gpt-small: 6 layers, width 384, bf16, 8 sequences x 128 tokens per step):
#   np1      one rank, batch 8 (one thread, and two threads: the whole 2-core machine)
#   dp2      mpirun -np 2, DP = 2, batch 4 per rank
#   tp2      mpirun -np 2 --tp 2, batch 8 shared by the TP pair
# then the memory table: per-rank bytes of parameters, gradients, master weights and AdamW
# state at TP = 1, 2, 4 (gpt-small with 12 heads, the same parameters, so that 4 divides the
# heads), against the target of 1/K + 5% of TP = 1, and the peak RSS of the largest rank.
# Timings: the median step after two warm-up steps, from metrics.jsonl.
#   bench/bench_tp.sh [path/to/meshtrain] [steps]
set -euo pipefail
MT=${1:-build/cpu/launch/meshtrain}
STEPS=${2:-15}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI=(mpirun --oversubscribe --bind-to none)
COMMON=(--quiet --set "train.steps=$STEPS" --set sample.tokens=0 --set eval.every=0
        --set train.seq_len=128)
echo "load before: $(uptime)"
"$MT" train "${COMMON[@]}" --set train.threads=1 --set train.batch_size=8 --set "run.dir=$OUT/np1" > /dev/null
"$MT" train "${COMMON[@]}" --set train.threads=2 --set train.batch_size=8 --set "run.dir=$OUT/np1_t2" > /dev/null
"${MPI[@]}" -np 2 "$MT" train "${COMMON[@]}" --set train.threads=1 --set train.batch_size=4 \
  --set "run.dir=$OUT/dp2" > /dev/null
"${MPI[@]}" -np 2 "$MT" train "${COMMON[@]}" --set train.threads=1 --set train.batch_size=8 \
  --tp 2 --set "run.dir=$OUT/tp2" > /dev/null
MEM=(--set train.steps=3 --set model.n_head=12 --set train.threads=1 --set train.batch_size=8)
"$MT" train "${COMMON[@]}" "${MEM[@]}" --set "run.dir=$OUT/mem1" > /dev/null
"${MPI[@]}" -np 2 "$MT" train "${COMMON[@]}" "${MEM[@]}" --tp 2 --set "run.dir=$OUT/mem2" > /dev/null
"${MPI[@]}" -np 4 "$MT" train "${COMMON[@]}" "${MEM[@]}" --tp 4 --set "run.dir=$OUT/mem4" > /dev/null
echo "load after: $(uptime)"
python3 - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
def memory(name):
    return next(r["memory"] for r in rows(name) if "memory" in r)
MiB = 1 << 20
print("| run | ranks x threads | ms/step | tokens/s (global) | vs np1 | peak RSS per rank, largest (MiB) | params+grads+master+Adam per rank (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- |")
base = None
for name, layout in [("np1", "1 x 1"), ("np1_t2", "1 x 2"), ("dp2", "2 x 1 (DP 2)"), ("tp2", "2 x 1 (TP 2)")]:
    st = [r for r in rows(name) if "ms" in r][2:]
    ms = statistics.median(r["ms"] for r in st)
    tps = statistics.median(r["tokens_per_s"] for r in st)
    base = base or tps
    m = memory(name)
    state = m["param_bytes"] + m["grad_bytes"] + m["master_bytes"] + m["adam_bytes"]
    print(f"| {name} | {layout} | {ms:.0f} | {tps:.0f} | {tps / base:.2f}x | {m['peak_rss_mib_max']:.0f} | {state / MiB:.1f} |")
print()
print("| TP | parameters (MiB) | gradients | master | AdamW | total | share of TP = 1 | target 1/K + 5% | activations (MiB) | peak RSS, largest rank (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
ref = None
for k in (1, 2, 4):
    m = memory(f"mem{k}")
    total = m["param_bytes"] + m["grad_bytes"] + m["master_bytes"] + m["adam_bytes"]
    ref = ref or total
    share = total / ref
    ok = "met" if share <= 1 / k + 0.05 else "MISSED"
    print(f"| {k} | {m['param_bytes'] / MiB:.2f} | {m['grad_bytes'] / MiB:.2f} | {m['master_bytes'] / MiB:.2f} | "
          f"{m['adam_bytes'] / MiB:.2f} | {total / MiB:.2f} | {share:.3f} | {1 / k + 0.05:.3f} ({ok}) | "
          f"{m['activation_bytes'] / MiB:.1f} | {m['peak_rss_mib_max']:.0f} |")
PY
