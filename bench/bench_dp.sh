#!/usr/bin/env bash
# Data parallelism, the two measurements of issue 5, in one command:
#
#  1. Weak scaling 1 -> 2 ranks on this machine: the default model (gpt-small, bf16, 8 x 128
#     tokens per rank and step), one thread per rank, `--bind-to core`. The 1-rank and 2-rank
#     runs are interleaved ROUNDS times so that load from other work hits both alike; every run
#     records the load average. Efficiency = (2-rank global tokens/s) / (2 x 1-rank tokens/s).
#  2. Overlap over a 10 Gbit/s link: two ranks in separate network namespaces joined by veth
#     links through a bridge, each link limited to 10 Gbit/s with tc tbf (tests/netns/netns.sh),
#     MPI over TCP only, each rank bound to a core of its own (a rankfile). Overlap on and off,
#     interleaved ROUNDS times. The share of the allreduce hidden behind backward = 1 - (exposed
#     with overlap on) / (exposed with overlap off): with overlap off every bucket is reduced
#     after backward, so its exposed time is the whole cost. "Exposed" is the reduction's wait
#     on the rank that waited least (the metrics' reduce_wait_min_ms): the last rank to finish
#     backward waits only for the reduction, while an earlier one also waits for it to arrive
#     (compute skew, which rank 0's own comm_wait_ms includes). Skipped (with a note) when not run as root. Open MPI's TCP transport moves bytes only
#     inside MPI calls; meshtrain's progress thread makes those calls while backward computes, so
#     Open MPI's own TCP progress thread is not needed and is left off, as a user would run
#     (BENCH_DP_TCP_PROGRESS_THREAD=1 turns it on). Buckets are the trainer's
#     default (an eighth of the gradients: the last bucket, which holds the embeddings and is
#     final only when backward ends, stays small); BENCH_DP_NET_BUCKET_MB sets a size instead.
#
#   bench/bench_dp.sh [path/to/meshtrain] [steps] [rounds]      (defaults: build/cpu, 15, 3)
#   BENCH_DP_PARTS="scaling overlap" selects the parts; extra `--set` flags for every run can be
#   given in BENCH_DP_SET (e.g. "--set dp.bucket_mb=4").
# Prints markdown tables (medians over steps 3..steps of each run, then over rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
MT=$(realpath "${1:-build/cpu/launch/meshtrain}")
STEPS=${2:-15}
ROUNDS=${3:-3}
PARTS=${BENCH_DP_PARTS:-scaling overlap}
[[ -x "$MT" ]] || { echo "bench_dp: no meshtrain at $MT (build the cpu preset first)" >&2; exit 1; }
NET_BIND=${BENCH_DP_NET_BIND:-core}
[[ $NET_BIND == core || $NET_BIND == none ]] ||
  { echo "bench_dp: BENCH_DP_NET_BIND='$NET_BIND': expected core or none" >&2; exit 1; }
TCP_THREAD=${BENCH_DP_TCP_PROGRESS_THREAD:-0}
[[ $TCP_THREAD == 0 || $TCP_THREAD == 1 ]] ||
  { echo "bench_dp: BENCH_DP_TCP_PROGRESS_THREAD='$TCP_THREAD': expected 0 or 1" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# shellcheck disable=SC2206
EXTRA=(${BENCH_DP_SET:-})
COMMON=(--quiet --set "train.steps=$STEPS" --set train.threads=1 --set sample.tokens=0
        --set eval.every=0 --set eval.batches=1 "${EXTRA[@]}")
load() { cut -d' ' -f1 /proc/loadavg; }
# The progress thread's longest nap between polls (comm/mpi/progress.hpp; auto: 2 ms on one node,
# 0.4 ms across nodes), passed to every rank.
export MESHTRAIN_COMM_POLL_US=${MESHTRAIN_COMM_POLL_US:-auto}

# summary NAME...: one row per configuration, medians over rounds of per-run medians.
summary() {
  python3 - "$OUT" "$@" <<'PY'
import json, os, statistics, sys
out, names = sys.argv[1], sys.argv[2:]
def runs(name):
    r = []
    for d in sorted(os.listdir(out)):
        if d.rsplit("_r", 1)[0] != name: continue
        rows = [json.loads(l) for l in open(f"{out}/{d}/metrics.jsonl")]
        st = [x for x in rows if "ms" in x][2:]           # the first two steps warm up
        cm = [x for x in rows if "comm_wait_ms" in x][2:]
        med = lambda k, xs: statistics.median(x.get(k, 0.0) for x in xs) if xs else 0.0
        r.append(dict(ms=med("ms", st), tps=med("tokens_per_s", st), wait=med("comm_wait_ms", cm),
                      least=med("reduce_wait_min_ms", cm), most=med("reduce_wait_max_ms", cm),
                      busy=med("comm_ms", cm), hid=med("comm_hidden", cm),
                      load=float(open(f"{out}/{d}/load").read())))
    return r
res = {n: runs(n) for n in names}
M = lambda n, k: statistics.median(x[k] for x in res[n])
print("| run | rounds | ms/step | tokens/s (global) | comm wait ms (rank 0) | least / most wait ms (ranks) "
      "| comm busy ms | hidden (per step) | load avg |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for n in names:
    loads = ", ".join(f"{x['load']:.1f}" for x in res[n])
    print(f"| {n} | {len(res[n])} | {M(n,'ms'):.0f} | {M(n,'tps'):.0f} | {M(n,'wait'):.1f} | "
          f"{M(n,'least'):.1f} / {M(n,'most'):.1f} | {M(n,'busy'):.1f} | {100*M(n,'hid'):.0f}% | {loads} |")
if "np1" in res and "np2" in res:
    eff = [b["tps"] / (2 * a["tps"]) for a, b in zip(res["np1"], res["np2"])]
    print(f"\nweak-scaling efficiency 1 -> 2 ranks, per round (interleaved runs): "
          f"{', '.join(f'{100*e:.0f}%' for e in eff)}; median {100*statistics.median(eff):.0f}%")
for on, off in (("np2", "np2_off"), ("net_on", "net_off")):
    if on in res and off in res and M(off, "least") > 0:
        hidden = 1 - M(on, "least") / M(off, "least")
        per_round = [1 - a["least"] / b["least"] for a, b in zip(res[on], res[off]) if b["least"] > 0]
        rank0 = 1 - M(on, "wait") / M(off, "wait") if M(off, "wait") > 0 else float("nan")
        by_step = (M(off, "ms") - M(on, "ms")) / M(off, "least")
        print(f"\n{on} vs {off}: allreduce hidden behind backward = 1 - exposed_on / exposed_off = "
              f"{100*hidden:.0f}% ({M(on,'least'):.1f} vs {M(off,'least'):.1f} ms exposed: the least "
              f"wait over the ranks, i.e. the last rank to finish backward); per round "
              f"{', '.join(f'{100*h:.0f}%' for h in per_round)}; from rank 0's wait alone (which "
              f"also holds its wait for slower ranks) {100*rank0:.0f}%; step-time gain / exposed_off "
              f"= {100*by_step:.0f}%")
PY
}

if [[ " $PARTS " == *" scaling "* ]]; then
  echo "## weak scaling 1 -> 2 ranks on this machine ($(nproc) cores), $STEPS steps x $ROUNDS rounds"
  for ((r = 1; r <= ROUNDS; r++)); do
    for cfg in np1 np2 np2_off; do
      d="$OUT/${cfg}_r$r"
      mkdir -p "$d"
      load > "$d/load"
      case $cfg in
        np1) "$MT" train "${COMMON[@]}" --set "run.dir=$d" > /dev/null ;;
        np2) mpirun -np 2 --bind-to core "$MT" train "${COMMON[@]}" --set "run.dir=$d" > /dev/null ;;
        np2_off) mpirun -np 2 --bind-to core "$MT" train "${COMMON[@]}" --set dp.overlap=off \
                   --set "run.dir=$d" > /dev/null ;;
      esac
    done
  done
  summary np1 np2 np2_off
fi

if [[ " $PARTS " == *" overlap "* ]]; then
  echo
  echo "## two ranks in two network namespaces, 10 Gbit/s tbf links, TCP, $STEPS steps x $ROUNDS rounds"
  if [[ $(id -u) -ne 0 ]]; then
    echo "(skipped: network namespaces need root)"
  else
    NETNS="$PWD/tests/netns/netns.sh"
    export MT_NETNS_PREFIX=mtbdp MT_NETNS_SUBNET=10.214.0
    "$NETNS" up 2
    trap '"$NETNS" down; rm -rf "$OUT"' EXIT
    "$NETNS" shape 1 rate 10gbit
    "$NETNS" shape 2 rate 10gbit
    "$NETNS" hostfile 1 > "$OUT/hosts"
    # Each emulated node gets a core of its own, as a real node would have (BENCH_DP_NET_BIND=none
    # lets both ranks float): unbound, each rank's compute thread competed for both cores with
    # the other rank and the kernel's network work, and one rank often ended backward 30-70 ms
    # after the other.
    BIND=(--bind-to none)
    if [[ $NET_BIND == core ]]; then
      awk -v n="$(nproc)" '{ printf "rank %d=%s slot=%d\n", NR - 1, $1, (NR - 1) % n }' \
        "$OUT/hosts" > "$OUT/rankfile"
      BIND=(--rankfile "$OUT/rankfile")
    fi
    for ((r = 1; r <= ROUNDS; r++)); do
      for cfg in net_on net_off; do
        d="$OUT/${cfg}_r$r"
        mkdir -p "$d"
        load > "$d/load"
        OMPI_MCA_btl_tcp_progress_thread=$TCP_THREAD "$NETNS" mpirun -np 2 --hostfile "$OUT/hosts" \
          "${BIND[@]}" -x OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM \
          -x OMPI_MCA_btl_tcp_progress_thread -x MESHTRAIN_COMM_POLL_US "$MT" train "${COMMON[@]}" \
          ${BENCH_DP_NET_BUCKET_MB:+--set "dp.bucket_mb=$BENCH_DP_NET_BUCKET_MB"} \
          --set "dp.overlap=${cfg#net_}" \
          --set "run.dir=$d" > /dev/null
      done
    done
    echo "link bytes node 1 (tx rx): $("$NETNS" stats 1)"
    summary net_on net_off
  fi
fi
