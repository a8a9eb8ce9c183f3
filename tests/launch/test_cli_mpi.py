"""`mpirun -np N meshtrain train` as a user runs it: rank 0 alone writes the run directory, the
losses of DP = N with batch 1 per rank match one process with batch N (fp32, float32 rounding),
the metrics carry the communication wait and the hidden share, and an error on one rank ends the
job instead of hanging the others."""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def train(cmd, run_dir, batch, extra=()):
    args = cmd + ["train", "--quiet", "--set", "model.preset=gpt-tiny", "--set", "train.steps=8",
                  "--set", f"train.batch_size={batch}", "--set", "train.seq_len=32",
                  "--set", "train.precision=fp32", "--set", "train.threads=1",
                  "--set", "sample.tokens=0", "--set", "eval.every=0", "--set", "dp.bucket_mb=0.05",
                  "--set", f"run.dir={run_dir}", *extra]
    p = subprocess.run(args, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return p.stdout, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True, help="mpiexec and its flags up to the process count flag, one string")
    ap.add_argument("--ranks", type=int, required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, one = train([a.meshtrain], os.path.join(tmp, "one"), a.ranks)
        out, dp = train(a.mpiexec.split() + [str(a.ranks), a.meshtrain], os.path.join(tmp, "dp"), 1)
        if out.count("done:") != 1:
            sys.exit(f"FAIL: expected one 'done:' line (rank 0 only), got:\n{out}")
        loss1 = [r["loss"] for r in one if "loss" in r]
        lossn = [r["loss"] for r in dp if "loss" in r]
        if len(loss1) != 8 or len(lossn) != 8:
            sys.exit(f"FAIL: step counts {len(loss1)} and {len(lossn)}")
        for s, (x, y) in enumerate(zip(loss1, lossn)):
            if abs(x - y) > 1e-5 * abs(x):
                sys.exit(f"FAIL: step {s + 1}: one rank {x}, {a.ranks} ranks {y}")
        # ZeRO-1 over MPI (reduce-scatter, sharded AdamW, all-gather) matches too.
        _, zero = train(a.mpiexec.split() + [str(a.ranks), a.meshtrain], os.path.join(tmp, "zero"), 1,
                        ("--set", "train.zero=1"))
        lossz = [r["loss"] for r in zero if "loss" in r]
        for s, (x, y) in enumerate(zip(loss1, lossz)):
            if abs(x - y) > 1e-5 * abs(x):
                sys.exit(f"FAIL: ZeRO-1 step {s + 1}: one rank {x}, {a.ranks} ranks {y}")
        # bf16 gradient reduction follows the fp32 run within bf16 rounding.
        mpi = a.mpiexec.split() + [str(a.ranks), a.meshtrain]
        _, low = train(mpi, os.path.join(tmp, "low"), 1, ("--set", "dp.reduce_dtype=bf16"))
        lossl = [r["loss"] for r in low if "loss" in r]
        for s, (x, y) in enumerate(zip(loss1, lossl)):
            if abs(x - y) > 5e-3 * abs(x):
                sys.exit(f"FAIL: bf16 reduction step {s + 1}: one rank {x}, {a.ranks} ranks {y}")
        # ZeRO-1 under the bf16 policy (sharded fp32 master weights) follows plain DP.
        bf = ("--set", "train.precision=bf16")
        _, plain16 = train(mpi, os.path.join(tmp, "plain16"), 1, bf)
        _, zero16 = train(mpi, os.path.join(tmp, "zero16"), 1, bf + ("--set", "train.zero=1"))
        lp = [r["loss"] for r in plain16 if "loss" in r]
        lz = [r["loss"] for r in zero16 if "loss" in r]
        for s, (x, y) in enumerate(zip(lp, lz)):
            if abs(x - y) > 1e-2 * abs(x):
                sys.exit(f"FAIL: bf16 ZeRO-1 step {s + 1}: plain DP {x}, ZeRO-1 {y}")
        rss = [r["peak_rss_mib"] for r in zero16 if "peak_rss_mib" in r]
        if len(rss) != 1 or len(rss[0]) != a.ranks or not all(v > 0 for v in rss[0]):
            sys.exit(f"FAIL: expected one peak_rss_mib line with {a.ranks} values, got {rss}")
        comm = [r for r in dp if "comm_wait_ms" in r]
        if len(comm) != 8 or not all(0 <= r["comm_hidden"] <= 1 and r["comm_ms"] >= 0 for r in comm):
            sys.exit(f"FAIL: communication metrics missing or out of range: {comm}")
        # The reduction's wait over the ranks: rank 0's own lies between the least and the most
        # (rank 0's comm_wait_ms is the reduction's wait alone in plain DP).
        for r in comm:
            lo, hi = r.get("reduce_wait_min_ms"), r.get("reduce_wait_max_ms")
            if lo is None or hi is None or not 0 <= lo <= hi or not lo - 0.01 <= r["comm_wait_ms"] <= hi + 0.01:
                sys.exit(f"FAIL: reduce_wait_min_ms/max_ms missing or inconsistent: {r}")
        if not os.path.exists(os.path.join(tmp, "dp", "model.safetensors")):
            sys.exit("FAIL: rank 0 wrote no model.safetensors")
    # An error on rank 0 alone (its run directory cannot be created) ends every rank, not a hang.
    bad = a.mpiexec.split() + [str(a.ranks), a.meshtrain, "train", "--set", "model.preset=gpt-tiny",
                               "--set", "train.seq_len=32", "--set", "run.dir=/proc/nonexistent/run"]
    p = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    if p.returncode == 0 or "error on rank 0" not in p.stderr:
        sys.exit(f"FAIL: a rank-0 error should end the job non-zero:\n{p.stdout}\n{p.stderr}")
    print(f"ok: {a.ranks} ranks match one rank over 8 steps")


if __name__ == "__main__":
    main()
