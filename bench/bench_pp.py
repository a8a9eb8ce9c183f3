#!/usr/bin/env python3
"""Pipeline bubble, measured from traces: for P stages and M = 1..16 micro-batches, a PP = P job
(mpirun -np P, one thread per rank) traces steps 4-6; scripts/plot_pipeline.py's measure gives each
stage's idle share of the step's pipeline phase (first forward to last backward over all ranks),
whose mean over stages and median over the traced steps is set beside the theory
(P - 1) / (M + P - 1), for 1f1b and gpipe (the same bubble in theory; gpipe keeps M micro-batches
alive), and (P - 1) / (V M + P - 1) for interleaved with --virtual V chunks per stage (only at M a
multiple of P, which it requires; other rows are skipped). The model is sized so that every stage
holds the same layers, for every schedule alike: layers = lcm(4, V) x P.

    bench/bench_pp.py --meshtrain build/cpu/launch/meshtrain [--stages 2 4] [--micro 1 2 4 8 16]
                      [--schedules 1f1b gpipe interleaved] [--virtual 2] [--steps 6]

Prints a markdown table and the machine's load average before and after each run."""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PLOT = os.path.join(HERE, "..", "scripts", "plot_pipeline.py")


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def measure(a, p, m, schedule, tmp):
    run_dir = os.path.join(tmp, f"p{p}m{m}{schedule}")
    traced = range(4, a.steps + 1)
    chunks = ["--set", f"pp.virtual_stages={a.virtual}"] if schedule == "interleaved" else []
    args = (a.mpiexec.split() + [str(p), a.meshtrain, "train", "--quiet"] + chunks +
            ["--set", "model.preset=gpt-tiny", "--set", f"model.n_layer={math.lcm(4, a.virtual) * p}",
             "--set", "model.n_embd=128",
            "--set", "train.seq_len=64", "--set", "train.batch_size=4", "--set", f"train.grad_accum={m}",
            "--set", f"train.steps={a.steps}", "--set", "train.threads=1", "--set", "sample.tokens=0",
            "--set", "eval.every=0", "--set", "data.val_fraction=0", "--set", f"pp.schedule={schedule}",
            "--set", f"trace.steps={traced.start}-{traced.stop - 1}", "--pp", str(p),
            "--set", f"run.dir={run_dir}"])
    before = load()
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        sys.exit(f"bench_pp: {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    bubbles = []
    for s in traced:
        out = subprocess.run([sys.executable, PLOT, os.path.join(run_dir, "traces"), "--step", str(s), "--json",
                              "--no-png"],
                             capture_output=True, text=True, check=True).stdout
        bubbles.append(json.loads(out.splitlines()[-1])["mean_bubble"])
    step_ms = [json.loads(l)["ms"] for l in open(os.path.join(run_dir, "metrics.jsonl"))
               if "\"ms\"" in l][2:]
    return statistics.median(bubbles), statistics.median(step_ms), before, load()


def memory(a, p, tmp):
    """Peak RSS per rank (max over ranks) and the trainer's own bytes on rank 0, for a 12 x 768
    GPT-2-shaped model (byte vocabulary: the weights and AdamW state dominate) at PP = p."""
    run_dir = os.path.join(tmp, f"mem{p}")
    args = (([a.meshtrain] if p == 1 else a.mpiexec.split() + [str(p), a.meshtrain]) +
            ["train", "--quiet", "--set", "model.preset=gpt-small", "--set", "model.n_layer=12",
             "--set", "model.n_head=12", "--set", "model.n_embd=768", "--set", "train.seq_len=64",
             "--set", "train.batch_size=1", "--set", f"train.grad_accum={max(p, 1)}", "--set", "train.steps=3",
             "--set", "train.threads=1", "--set", "sample.tokens=0", "--set", "eval.every=0",
             "--set", "data.val_fraction=0", "--set", f"run.dir={run_dir}"] + (["--pp", str(p)] if p > 1 else []))
    r = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit(f"bench_pp: {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    rec = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"memory"' in l][-1]
    m = rec["memory"]
    own = m["param_bytes"] + m["grad_bytes"] + m["master_bytes"] + m["adam_bytes"] + m["activation_bytes"]
    return max(rec["peak_rss_mib"]), own / 2**20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", default="mpirun --oversubscribe -np")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    ap.add_argument("--virtual", type=int, default=2, help="model chunks per stage for interleaved")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--memory", type=int, nargs="*", default=None,
                    help="instead: peak memory per rank at these PP sizes (e.g. 1 2 4) on a 12 x 768 model")
    a = ap.parse_args()
    if a.memory is not None:
        print("| PP | peak RSS per rank, max over ranks (MiB) | rank 0's params+grads+master+AdamW+activations (MiB) | "
              "vs PP 1 | load |")
        print("| --- | --- | --- | --- | --- |")
        base = None
        with tempfile.TemporaryDirectory() as tmp:
            for p in a.memory:
                rss, own = memory(a, p, tmp)
                base = base or rss
                print(f"| {p} | {rss:.0f} | {own:.0f} | {100 * rss / base:.0f}% | {load()} |", flush=True)
        return
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; {platform.processor() or platform.machine()}")
    print()
    print("| P | M | schedule | theory bubble | measured bubble (mean over stages, median of steps) | "
          "step ms (median) | load before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for p in a.stages:
            for m in a.micro:
                for sched in a.schedules:
                    v = a.virtual if sched == "interleaved" else 1
                    if v > 1 and m % p:
                        continue  # interleaved needs M a multiple of P
                    b, ms, l0, l1 = measure(a, p, m, sched, tmp)
                    theory = (p - 1) / (v * m + p - 1)
                    name = f"{sched} V={v}" if v > 1 else sched
                    print(f"| {p} | {m} | {name} | {100 * theory:.1f}% | {100 * b:.1f}% | {ms:.1f} | {l0} -> {l1} |",
                          flush=True)


if __name__ == "__main__":
    main()
