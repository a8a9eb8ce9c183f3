#!/usr/bin/env bash
# CI: builds the libFuzzer targets of the file readers (the fuzz preset: clang, ASan + UBSan;
# tests/fuzz/README.md) and runs each from its checked-in corpus for FUZZ_SECONDS. Exits non-zero
# on any finding (a sanitizer report, an uncaught exception, an abort, an input that takes
# longer than 10 s, an allocation over 256 MiB or 2 GiB resident), printing the reproducer's path.
#
#   scripts/ci_fuzz.sh                 every target for 60 s, all at once (about a minute in all)
#   FUZZ_SECONDS=600 FUZZ_TARGETS="safetensors config" FUZZ_JOBS=1 scripts/ci_fuzz.sh
#
# FUZZ_JOBS: targets run at once (default: all of them; on fewer cores they share them, which
# keeps CI's time fixed at FUZZ_SECONDS).
#
# New corpus entries go to build/fuzz/corpus/TARGET (the checked-in corpus is only read);
# reproducers and logs to build/fuzz/findings.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
read -r -a targets <<< "${FUZZ_TARGETS:-safetensors token_shard config checkpoint hf_import tokenizer_json}"
max_jobs="${FUZZ_JOBS:-${#targets[@]}}"

start=$SECONDS
scripts/setup.sh fuzz
echo "ci_fuzz: fuzz targets built in $((SECONDS - start)) s"

bin=build/fuzz/tests/fuzz
out=build/fuzz/findings
mkdir -p "$out"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

run_one() {
  local t=$1
  local work=build/fuzz/corpus/$t
  mkdir -p "$work"
  local dict=() rc
  [[ -f tests/fuzz/dict/$t.dict ]] && dict=(-dict="tests/fuzz/dict/$t.dict")
  rm -f "$out/$t.rc"
  timeout --signal=KILL $((seconds + 300)) "$bin/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
    -print_final_stats=1 -artifact_prefix="$out/$t-" "${dict[@]}" \
    "$work" "tests/fuzz/corpus/$t" > "$out/$t.log" 2>&1 && rc=0 || rc=$?
  echo "$rc" > "$out/$t.rc"
}

failed=()
for t in "${targets[@]}"; do
  [[ -x $bin/fuzz_$t ]] || { echo "ci_fuzz: no fuzz target '$t' in $bin" >&2; exit 2; }
  while (( $(jobs -rp | wc -l) >= max_jobs )); do wait -n || true; done
  echo "ci_fuzz: fuzzing $t for $seconds s"
  run_one "$t" &
done
wait
for t in "${targets[@]}"; do
  if [[ $(cat "$out/$t.rc" 2>/dev/null) == 0 ]]; then
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$' || true)
    rate=$(grep -o 'exec/s: [0-9]*' "$out/$t.log" | tail -1 | grep -o '[0-9]*$' || true)
    echo "ci_fuzz: $t: no findings (${execs:-?} inputs, ${rate:-?} exec/s)"
  else
    failed+=("$t")
    echo "ci_fuzz: $t: FINDING; the end of its log ($out/$t.log):" >&2
    tail -n 60 "$out/$t.log" >&2
    repro=$(grep -o 'Test unit written to .*' "$out/$t.log" | sed 's/Test unit written to //' || true)
    echo "ci_fuzz: $t: reproducer: ${repro:-none written (see the log)}" >&2
    echo "ci_fuzz: replay it with: $bin/fuzz_$t ${repro:-INPUT}" >&2
  fi
done
echo "ci_fuzz: done in $((SECONDS - start)) s"
if ((${#failed[@]})); then
  echo "ci_fuzz: findings in: ${failed[*]}" >&2
  exit 1
fi
