#!/usr/bin/python3
"""One training step, meshtrain against PyTorch, side by side in one run (issue 3's benchmark).

The same model on the same machine: GPT with 6 layers, width 384, 6 heads, sequence 256,
batch 8, the 256-symbol byte vocabulary, bf16 (meshtrain's bf16 policy; PyTorch with bf16
autocast on CPU), AdamW with weight decay and gradient clipping. Rounds alternate the two
(meshtrain, then PyTorch, then meshtrain, ...) so that load from other processes falls on both
alike; each run is its own process, so its peak resident memory (getrusage of the child) is
that training process's own.

meshtrain runs as a user runs it: `meshtrain train` on its built-in corpus, step times read
from metrics.jsonl. PyTorch runs a GPT-2 written below in idiomatic PyTorch 1.13 (nn.Module,
nn.Linear, fused nn.LayerNorm, tanh GELU, masked softmax attention, cross-entropy, AdamW with
foreach) on random byte tokens: the timing of a step does not depend on the data.

  bench/bench_train.py [--meshtrain build/cpu/launch/meshtrain] [--rounds 3] [--steps 20]
                       [--threads 2]

Prints a Markdown table: median ms/step and tokens/s over the steps after warm-up, the ratio,
peak RSS of each process, and meshtrain's MFU against the bf16 matmul rate it measured itself.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

MODEL = dict(n_layer=6, n_head=6, n_embd=384, vocab=256, seq=256, batch=8)
WARMUP = 3  # steps dropped from each run's statistics (first-touch, primitive creation)


def torch_worker(args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    L, H, C, V, T, B = (MODEL[k] for k in ("n_layer", "n_head", "n_embd", "vocab", "seq",
                                          "batch"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
            self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

        def forward(self, x):
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=-1)
            q, k, v = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(C // H))
            att = F.softmax(att.masked_fill(self.mask, float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
            self.h = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(C)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(T))
            for block in self.h:
                x = block(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied embedding
            return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1))

    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=True)
    gen = torch.Generator().manual_seed(7)
    times = []
    for _ in range(args.steps):
        data = torch.randint(0, V, (B, T + 1), generator=gen)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0) * 1e3)
        if not math.isfinite(loss.item()):
            sys.exit(f"torch worker: loss is {loss.item()}")
    print(json.dumps({"ms": times, "torch": torch.__version__}))


def meshtrain_run(args, tmp, rnd, env):
    run_dir = os.path.join(tmp, f"mt{rnd}")
    cmd = [args.meshtrain, "train", "--quiet",
           "--set", "model.preset=gpt-small", "--set", "model.vocab=bytes",
           "--set", f"model.n_layer={MODEL['n_layer']}", "--set", f"model.n_head={MODEL['n_head']}",
           "--set", f"model.n_embd={MODEL['n_embd']}", "--set", f"model.block_size={MODEL['seq']}",
           "--set", f"train.seq_len={MODEL['seq']}", "--set", f"train.batch_size={MODEL['batch']}",
           "--set", "train.precision=bf16", "--set", f"train.steps={args.steps}",
           "--set", f"train.threads={args.threads}", "--set", "train.weight_decay=0.1",
           "--set", "train.grad_clip=1.0", "--set", "eval.every=0", "--set", "eval.batches=1",
           "--set", "sample.tokens=0", "--set", f"run.dir={run_dir}"]
    with open(os.path.join(tmp, f"mt{rnd}.log"), "w") as log:
        code, rss = run_measured_logged(cmd, env, log)
    if code != 0:
        sys.exit(f"bench_train: meshtrain exited with {code}; see {log.name}:\n"
                 + open(log.name).read()[-3000:])
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [r for r in rows if "ms" in r]
    if len(steps) != args.steps:
        sys.exit(f"bench_train: expected {args.steps} step records in {run_dir}/metrics.jsonl, "
                 f"found {len(steps)}")
    return [r["ms"] for r in steps], rss, steps[-1].get("mfu", float("nan"))


def run_measured_logged(cmd, env, log):
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.execvpe(cmd[0], cmd, env)
        finally:
            os._exit(127)
    _, status, ru = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), ru.ru_maxrss / 1024.0


def torch_run(args, tmp, rnd, env):
    out_path = os.path.join(tmp, f"torch{rnd}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-worker", "--steps",
           str(args.steps), "--threads", str(args.threads)]
    with open(out_path, "w") as f:
        code, rss = run_measured_logged(cmd, env, f)
    text = open(out_path).read()
    if code != 0:
        sys.exit(f"bench_train: the PyTorch worker exited with {code}:\n{text[-3000:]}")
    r = json.loads(text.strip().splitlines()[-1])
    return r["ms"], rss, r["torch"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meshtrain", default="build/cpu/launch/meshtrain")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= WARMUP:
        ap.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if args.torch_worker:
        return torch_worker(args)
    if not os.access(args.meshtrain, os.X_OK):
        ap.error(f"--meshtrain {args.meshtrain}: not an executable (build the cpu preset first)")

    env = dict(os.environ)
    tokens = MODEL["batch"] * MODEL["seq"]
    ours, theirs, mfus = [], [], []
    rss_ours, rss_theirs = [], []
    version = "?"
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            ms, rss, mfu = meshtrain_run(args, tmp, rnd, env)
            ours += ms[WARMUP:]
            rss_ours.append(rss)
            mfus.append(mfu)
            ms, rss, version = torch_run(args, tmp, rnd, env)
            theirs += ms[WARMUP:]
            rss_theirs.append(rss)
            print(f"round {rnd + 1}/{args.rounds}: meshtrain {statistics.median(ours):.0f} ms, "
                  f"PyTorch {statistics.median(theirs):.0f} ms (medians so far)", file=sys.stderr)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"GPT {MODEL['n_layer']}L/{MODEL['n_embd']}/{MODEL['n_head']}H, seq {MODEL['seq']}, "
          f"batch {MODEL['batch']}, byte vocab, bf16, {args.threads} threads; "
          f"{args.rounds} alternating rounds x {args.steps - WARMUP} timed steps; "
          f"PyTorch {version}; load average before: {os.getloadavg()[0]:.2f}")
    print()
    print("| | ms/step (median) | tokens/s | peak RSS MiB | MFU |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| meshtrain | {mo:.1f} | {tokens / mo * 1e3:.0f} | {max(rss_ours):.0f} | "
          f"{100 * statistics.median(mfus):.1f}% |")
    print(f"| PyTorch | {mt:.1f} | {tokens / mt * 1e3:.0f} | {max(rss_theirs):.0f} | |")
    print()
    print(f"meshtrain / PyTorch tokens/s: {mt / mo:.2f}x; peak RSS ratio "
          f"{max(rss_ours) / max(rss_theirs):.2f}")


if __name__ == "__main__":
    main()
