#!/usr/bin/env bash
# GPU benchmark, side by side in one run: GPT-2 124M, sequence 1024, bf16, meshtrain
# (build/cuda/bench/bench_gpu) against PyTorch eager and torch.compile on the same GPU, for
# each batch size given; then meshtrain's training step against PyTorch's from the same weights.
# Writes RESULTS_DIR/bench.md (a table), RESULTS_DIR/bench.jsonl (one object per run) and
# RESULTS_DIR/step_check.txt.
#
#   bench/gpu/run_bench.sh RESULTS_DIR [BATCH...]        (default batches: 16 32)
# Exit status 1 when a run failed or the step check did not pass.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out="${1:?usage: run_bench.sh RESULTS_DIR [BATCH...]}"
shift
batches=("$@")
((${#batches[@]})) || batches=(16 32)
mkdir -p "$out"
bin=build/cuda/bench/bench_gpu
py="${PYTHON:-python3}"
jsonl="$out/bench.jsonl"
: > "$jsonl"
runs=$(mktemp -d)  # one JSON per run; only the summary files go to RESULTS_DIR
trap 'rm -rf "$runs"' EXIT
export PYTHONUNBUFFERED=1

run() {  # run NAME JSON_FILE COMMAND...: appends the JSON, or a failure record
  local name=$1 json=$2
  shift 2
  echo "== $name: $*"
  if "$@" --json "$json"; then
    { cat "$json"; echo; } >> "$jsonl"  # one object per line, whatever the writer ended with
  else
    echo "{\"impl\": \"$name\", \"failed\": true}" >> "$jsonl"
  fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv || true
run_batch() {  # meshtrain, eager and compiled PyTorch, interleaved, at batch $1
  local b=$1
  run meshtrain "$runs/m_$b.json" "$bin" --batch "$b" --seq 1024 --steps 20 --warmup 3
  run torch-eager "$runs/e_$b.json" "$py" bench/gpu/bench_torch.py --mode eager --batch "$b"
  run torch-compile "$runs/c_$b.json" "$py" bench/gpu/bench_torch.py --mode compile --batch "$b"
}
# The first batch size, then the correctness check of the step (cheap, and worth more than a
# second batch size if time runs out), then the other batch sizes.
run_batch "${batches[0]}"

echo "== training step against PyTorch from the same weights (batch 8, 10 steps)"
check_dir=$(mktemp -d)
if "$bin" --batch 8 --seq 1024 --steps 8 --warmup 2 --dump "$check_dir" >/dev/null &&
   "$py" bench/gpu/bench_torch.py --check "$check_dir" | tee "$out/step_check.txt"; then
  step_check="passed"
else
  step_check="FAILED (see step_check.txt)"
fi
rm -rf "$check_dir"

for b in "${batches[@]:1}"; do run_batch "$b"; done

"$py" - "$jsonl" "$step_check" > "$out/bench.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
# PyTorch runs get their MFU from meshtrain's FLOP count per token and GEMM rate (same model).
ref = next((r for r in rows if r["impl"] == "meshtrain" and not r.get("failed")), None)
if ref:
    fpt = ref["model_tflops"] * 1e12 / ref["tokens_per_s"]
    peak = ref["model_tflops"] / ref["mfu_datasheet"] * 1e12
    for r in rows:
        if not r.get("failed") and "mfu_datasheet" not in r:
            r["mfu_datasheet"] = r["tokens_per_s"] * fpt / peak
            r["mfu_gemm"] = r["tokens_per_s"] * fpt / (ref["gemm_8192_tflops"] * 1e12)
print("| impl | batch | tokens/s | ms/step | MFU (datasheet) | MFU (GEMM) | peak GiB |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    if r.get("failed"):
        print(f"| {r['impl']} | | failed | | | | |")
        continue
    mfu = lambda k: f"{100 * r[k]:.1f}%" if k in r else ""
    print(f"| {r['impl']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.1f} | "
          f"{mfu('mfu_datasheet')} | {mfu('mfu_gemm')} | {r['peak_memory_bytes'] / 2**30:.2f} |")
print(f"\ntraining step vs PyTorch from the same weights: {sys.argv[2]}")
PY
cat "$out/bench.md"
# Non-zero when a run failed or the step check did not pass (bench.md says which).
failed=$(grep -c '"failed": true' "$jsonl")
if ((failed > 0)) || [[ $step_check != passed ]]; then
  echo "run_bench.sh: $failed run(s) failed; step check: $step_check" >&2
  exit 1
fi
