#!/usr/bin/python3
"""The CPU training step of a Llama-family model against GPT's at similar FLOPs, side by side.

llama-small (6 layers, width 384, 6 query heads over 2 KV heads, SwiGLU of width 1152, RMSNorm,
rotary embeddings, tied head) and gpt-small (6 layers, width 384, 6 heads, GELU MLP of width
1536, LayerNorm, learned positions), both on the 256-symbol byte vocabulary and the built-in
corpus, bf16, one rank: `meshtrain train` as a user runs it, alternating the two models round by
round so that load from other processes falls on both alike. Reads ms/step and MFU (each run's
FLOPs per token over its own measured bf16 matmul peak) from metrics.jsonl, after warm-up.

  bench/bench_llama_step.py [--meshtrain build/cpu/launch/meshtrain] [--rounds 3] [--steps 12]
                            [--seq 256] [--batch 8] [--threads 1]

Prints a Markdown table with the load average before and after.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

WARMUP = 2


def run(mt, preset, args, tmp):
    rd = os.path.join(tmp, preset)
    cmd = [mt, "train", "--quiet", "--set", f"model.preset={preset}", "--set",
           f"train.steps={args.steps}", "--set", f"train.seq_len={args.seq}", "--set",
           f"train.batch_size={args.batch}", "--set", f"train.threads={args.threads}", "--set",
           f"run.dir={rd}", "--set", "sample.tokens=0", "--set", "eval.every=0", "--set",
           "eval.batches=1"]
    if preset == "gpt-small" and args.seq > 256:
        cmd += ["--set", f"model.block_size={args.seq}"]
    subprocess.run(cmd, check=True, capture_output=True)
    steps = []
    with open(os.path.join(rd, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "ms" in j and "mfu" in j:
                steps.append(j)
    steps = steps[WARMUP:]
    return [s["ms"] for s in steps], [s["mfu"] for s in steps]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", default="build/cpu/launch/meshtrain")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    load0 = os.getloadavg()
    res = {"gpt-small": ([], []), "llama-small": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for preset in ("gpt-small", "llama-small"):
                ms, mfu = run(args.meshtrain, preset, args, tmp)
                res[preset][0].extend(ms)
                res[preset][1].extend(mfu)
    load1 = os.getloadavg()
    print(f"batch {args.batch} x seq {args.seq}, bf16, {args.threads} thread(s), "
          f"{args.rounds} rounds x {args.steps} steps ({WARMUP} warm-up dropped); "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after, {os.cpu_count()} CPUs\n")
    print("| model | median ms/step | median MFU |")
    print("| --- | --- | --- |")
    for preset, (ms, mfu) in res.items():
        print(f"| {preset} | {statistics.median(ms):.1f} | {100 * statistics.median(mfu):.1f}% |")
    g = statistics.median(res["gpt-small"][1])
    l = statistics.median(res["llama-small"][1])
    print(f"\nLlama MFU - GPT MFU: {100 * (l - g):+.1f} points")


if __name__ == "__main__":
    main()
