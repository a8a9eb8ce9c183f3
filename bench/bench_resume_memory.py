#!/usr/bin/python3
"""Peak memory of a resumed run against a fresh run of the same config (issue 16, item 13).

For each layout (1 rank; mpirun -np 3; mpirun -np 3 with ZeRO-1), on the default small GPT
(gpt-small, seq 128, batch 8, bf16): a fresh run of 2 steps that checkpoints at step 2, then
--resume latest to step 3 in the same run directory; the peak RSS of every rank comes from
metrics.jsonl's memory record (getrusage's ru_maxrss), and the largest rank is reported. With
--ref OLD (a meshtrain binary from before the change) the same is run with it, side by side.

    bench_resume_memory.py --meshtrain build/cpu/launch/meshtrain [--ref OLD] [--rounds N]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
COMMON = ["--quiet", "--set", "model.preset=gpt-small", "--set", "train.threads=1",
          "--set", "sample.tokens=0", "--set", "eval.every=0", "--set", "checkpoint.every=2"]


def peak(run_dir):
    recs = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))
            if "peak_rss_mib" in l]
    return [max(r["peak_rss_mib"]) for r in recs]


def measure(binary, ranks, extra, tmp):
    run_dir = tempfile.mkdtemp(dir=tmp)
    cmd = ([] if ranks == 1 else ["mpirun", "--oversubscribe", "-np", str(ranks)]) + [binary, "train"]
    for steps, more in ((2, []), (3, ["--resume", "latest"])):
        p = subprocess.run(cmd + COMMON + extra + ["--set", f"train.steps={steps}", "--set",
                                                   f"run.dir={run_dir}"] + more,
                           capture_output=True, text=True, env=ENV, timeout=1200)
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    fresh, resumed = peak(run_dir)
    return fresh, resumed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--ref")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    layouts = [("1 rank", 1, []), ("3 ranks (DP 3)", 3, []),
               ("3 ranks, ZeRO-1", 3, ["--set", "train.zero=1"])]
    binaries = [("new", a.meshtrain)] + ([("old", a.ref)] if a.ref else [])
    print(f"load average before: {os.getloadavg()[0]:.1f}; cores {os.cpu_count()}")
    print("| layout | binary | fresh peak RSS (MiB) | resumed peak RSS (MiB) | resumed / fresh |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for label, ranks, extra in layouts:
            for _ in range(a.rounds):
                for name, b in binaries:
                    fresh, resumed = measure(b, ranks, extra, tmp)
                    print(f"| {label} | {name} | {fresh:.0f} | {resumed:.0f} | "
                          f"{resumed / fresh:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
