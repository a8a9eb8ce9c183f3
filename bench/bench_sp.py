#!/usr/bin/env python3
"""Sequence parallelism (tp.sequence_parallel) on vs off at TP = 2 and TP = 4: the activation bytes
that `meshtrain plan` plans, what the trainer allocates (its memory record in metrics.jsonl: rank 0's
activation buffers) and the peak RSS of the largest rank, for gpt-small and llama-small (bf16,
micro-batch 4 x 256, 12 heads of 32 so that TP 4 divides them, 3 steps), with the step time (median of steps 2-3; a memory benchmark first:
rerun with more steps on a quiet machine for speed).

    bench/bench_sp.py --meshtrain build/cpu/launch/meshtrain [--tp 2 4] [--models gpt-small llama-small]

Prints a markdown table."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"bench_sp: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                 f"{r.stderr[-2000:]}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", default="mpirun --allow-run-as-root --oversubscribe -np")
    ap.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--models", nargs="+", default=["gpt-small", "llama-small"])
    a = ap.parse_args()
    # 12 heads of 32 (the presets have 6 of 64: the same parameters), so that TP 4 splits them.
    shape = ["--set", "train.batch_size=4", "--set", "train.seq_len=256", "--set", "model.n_head=12"]
    print("| model | TP | SP | planned activations (MiB) | allocated, rank 0 (MiB) | vs SP off | "
          "peak RSS, largest rank (MiB) | ms/step | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models:
            for tp in a.tp:
                off = None
                for sp in ("false", "true"):
                    flags = ["--set", f"model.preset={model}", "--set", f"tp.sequence_parallel={sp}"]
                    plan = run([a.meshtrain, "plan", "--tp", str(tp)] + shape + flags)
                    planned = float(re.search(r"activations\s+([0-9.]+) MiB", plan).group(1))
                    d = os.path.join(tmp, f"{model}-{tp}-{sp}")
                    load = open("/proc/loadavg").read().split()[0]
                    run(a.mpiexec.split() + [str(tp), a.meshtrain, "train", "--quiet", "--tp", str(tp),
                         "--set", "train.steps=3", "--set", "train.threads=1", "--set", "sample.tokens=0",
                         "--set", "eval.every=0", "--set", "data.val_fraction=0", "--set",
                         f"run.dir={d}"] + shape + flags)
                    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
                    mem = [x for x in rows if "memory" in x][-1]
                    act = mem["memory"]["activation_bytes"] / 2**20
                    ms = statistics.median([x["ms"] for x in rows if "ms" in x][1:])
                    off = act if off is None else off
                    print(f"| {model} | {tp} | {'on' if sp == 'true' else 'off'} | {planned:.2f} | "
                          f"{act:.2f} | {100 * act / off:.0f}% | {mem['memory']['peak_rss_mib_max']:.0f} | "
                          f"{ms:.0f} | {load} |", flush=True)


if __name__ == "__main__":
    main()
