#!/usr/bin/env python3
"""The PyTorch side of the GPU benchmark, and the check of meshtrain's training step.

  bench_torch.py --mode eager|compile [--batch 16] [--seq 1024] [--steps 20] [--warmup 3]
                 [--json FILE]
      GPT-2 124M (the same architecture as meshtrain's: tied LM head, tanh GELU, causal SDPA)
      trained with bf16 autocast and fused AdamW; prints tokens/s and peak memory.
  bench_torch.py --check DIR [--tol 0.05]
      DIR from `bench_gpu --dump DIR`: loads meshtrain's initial weights and batch, trains the
      same number of steps with the same recipe (clip 1.0, AdamW lr 1e-4, betas 0.9/0.95,
      eps 1e-8, no decay) and compares the loss of every step with meshtrain's. Exits 1 when
      any step differs by more than --tol (absolute, in nats).
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(c)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(c, 3 * c)
        self.attn.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(c, 4 * c)
        self.mlp.c_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Parameter names are meshtrain's (Hugging Face GPT-2 names, nn.Linear [out, in])."""

    def __init__(self, n_layer=12, n_head=12, c=768, vocab=50257, padded_vocab=50304, block=1024):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(padded_vocab, c)
        self.wpe = nn.Embedding(block, c)
        self.h = nn.ModuleList(Block(c, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(c)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)[..., : self.vocab]
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), targets.reshape(-1),
                               ignore_index=-1)


def make_optimizer(model, lr):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             weight_decay=0.0, fused=True)


def train_step(model, opt, idx, targets):
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(idx, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def bench(args):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = GPT(block=max(1024, args.seq)).to(dev)
    opt = make_optimizer(model, 1e-4)
    step = train_step
    if args.mode == "compile":
        model = torch.compile(model)
    idx = torch.randint(0, 50257, (args.batch, args.seq), device=dev)
    targets = torch.roll(idx, -1, dims=1)
    for _ in range(args.warmup):
        step(model, opt, idx, targets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step(model, opt, idx, targets)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens_per_s = args.batch * args.seq * args.steps / elapsed
    peak = torch.cuda.max_memory_allocated()
    print(f"torch {args.mode}: batch {args.batch} x seq {args.seq}: {tokens_per_s:.0f} tokens/s, "
          f"{1e3 * elapsed / args.steps:.1f} ms/step, peak memory {peak / 2**30:.2f} GiB, "
          f"loss {loss.item():.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"impl": f"torch-{args.mode}", "device": torch.cuda.get_device_name(),
                       "torch": torch.__version__, "batch": args.batch, "seq": args.seq,
                       "tokens_per_s": tokens_per_s, "ms_per_step": 1e3 * elapsed / args.steps,
                       "peak_memory_bytes": peak}, f)
            f.write("\n")


def check(args):
    from safetensors.torch import load_file

    dev = torch.device("cuda")
    weights = load_file(f"{args.check}/init.safetensors")
    batch = load_file(f"{args.check}/batch.safetensors")
    ours = json.load(open(f"{args.check}/losses.json"))["losses"]
    model = GPT().to(dev)
    model.load_state_dict({k: v.to(dev) for k, v in weights.items()}, strict=True)
    opt = make_optimizer(model, 1e-4)
    idx = batch["tokens"].to(dev).long()
    targets = batch["targets"].to(dev).long()
    worst = 0.0
    for i, want in enumerate(ours):
        got = train_step(model, opt, idx, targets).item()
        worst = max(worst, abs(got - want))
        print(f"step {i + 1}: meshtrain {want:.4f}  torch {got:.4f}  diff {got - want:+.4f}")
    print(f"worst |loss difference| over {len(ours)} steps: {worst:.4f} (tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json")
    p.add_argument("--check")
    p.add_argument("--tol", type=float, default=0.05)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_torch.py: no CUDA device", file=sys.stderr)
        return 2
    if args.check:
        return check(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
