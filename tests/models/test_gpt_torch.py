#!/usr/bin/python3
"""meshtrain's GPT against a GPT-2 written here in PyTorch, with the same weights.

gpt_runner (tests/models/gpt_runner.cpp) runs meshtrain and writes weights, inputs, loss,
gradients and trained weights to safetensors; this script redoes the computation in PyTorch in
float64 and compares. Checks, each with its tolerance stated where it is applied:

  1. fp32 policy: loss and every parameter gradient, byte vocabulary (256) and a padded
     vocabulary (300 real tokens in 384 rows, targets including ignored -1 positions).
  2. bf16 policy: the same, against float64 on the bf16-rounded weights meshtrain computed with.
  3. Ten Trainer steps in fp32 (AdamW, decay on 2-D weights only, clipping, warm-up + cosine,
     gradient accumulation 2) against torch.optim.AdamW: losses, gradient norms, and every
     parameter after the ten steps.

Errors are norm-wise relative per tensor: |ours - ref| / |ref|. Exits non-zero on any mismatch.

  test_gpt_torch.py --runner PATH/gpt_runner
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

torch.set_num_threads(1)

# Tolerances: norm-wise relative error per tensor.
TOL_FP32 = 1e-5       # fp32 policy, one forward/backward (issue 3: "about 1e-5 relative")
TOL_BF16 = 2e-2       # bf16 policy (issue 3: "about 2e-2")
TOL_TRAIN_LOSS = 1e-5  # per-step loss and gradient norm over ten fp32 steps
# Parameters after ten AdamW steps, measured on the change from the initial weights (a far
# stricter test than on the weights themselves, which the initialisation dominates). Adam
# divides by sqrt(v), so float32 rounding in small gradient entries is amplified; fp32 reaches
# about 2e-5 here (LayerNorm weights), and 1e-4 leaves a factor of five.
TOL_TRAIN_PARAMS = 1e-4


def read_safetensors(path):
    """A minimal reader (the safetensors package is not a Debian package): name -> tensor."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    base = 8 + n
    dtypes = {"F32": np.float32, "I32": np.int32}
    out = {}
    for name, e in header.items():
        if e["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}, expected F32 or I32")
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[base + b:base + end], dtype=dtypes[e["dtype"]])
        out[name] = torch.from_numpy(arr.reshape(e["shape"]).copy())
    return out, meta


class RefGPT:
    """GPT-2 in plain PyTorch: pre-LN blocks, learned positions, tied embedding, tanh GELU,
    causal attention, and cross-entropy over the real vocabulary only (padded rows of the
    embedding exist but their logits are left out of the softmax). Weights are nn.Linear
    [out, in] with Hugging Face names, as meshtrain's."""

    def __init__(self, params, n_layer, n_head, vocab_size):
        self.p = params  # name -> leaf tensor with requires_grad
        self.n_layer, self.n_head, self.vocab = n_layer, n_head, vocab_size

    @staticmethod
    def layernorm(x, w, b):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w + b

    @staticmethod
    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    def attention(self, qkv):
        B, T, C3 = qkv.shape
        C = C3 // 3
        H, D = self.n_head, C // self.n_head
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, C)

    def loss(self, tokens, targets):
        p = self.p
        T = tokens.shape[1]
        x = p["wte.weight"][tokens.long()] + p["wpe.weight"][:T]
        for l in range(self.n_layer):
            h = f"h.{l}."
            a = self.layernorm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            qkv = a @ p[h + "attn.c_attn.weight"].T + p[h + "attn.c_attn.bias"]
            y = self.attention(qkv)
            x = x + y @ p[h + "attn.c_proj.weight"].T + p[h + "attn.c_proj.bias"]
            a = self.layernorm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            m = self.gelu(a @ p[h + "mlp.c_fc.weight"].T + p[h + "mlp.c_fc.bias"])
            x = x + m @ p[h + "mlp.c_proj.weight"].T + p[h + "mlp.c_proj.bias"]
        x = self.layernorm(x, p["ln_f.weight"], p["ln_f.bias"])
        logits = x @ p["wte.weight"].T
        logits = logits[..., :self.vocab]  # padded rows never take part
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, self.vocab), targets.reshape(-1).long(), ignore_index=-1)


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    denom = ref.norm().item()
    diff = (ours - ref).norm().item()
    return diff / denom if denom > 0 else diff


class Report:
    def __init__(self):
        self.failures = []

    def check(self, what, err, tol):
        ok = err <= tol and math.isfinite(err)
        print(f"  {'ok  ' if ok else 'FAIL'} {what:<40} rel err {err:.2e} (tolerance {tol:.0e})")
        if not ok:
            self.failures.append(f"{what}: {err:.3e} > {tol:.0e}")

    def require(self, what, cond):
        print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            self.failures.append(what)


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)} exited with {r.returncode}:\n{r.stdout}{r.stderr}")


def check_grads(runner, tmp, precision, vocab, padded, tol, report):
    out = os.path.join(tmp, f"grads_{precision}_{vocab}.safetensors")
    run([runner, "grads", "--precision", precision, "--vocab", str(vocab), "--padded-vocab",
         str(padded), "--out", out])
    t, meta = read_safetensors(out)
    print(f"{precision}, vocab {vocab} padded to {padded}:")
    names = [k[len("param."):] for k in t if k.startswith("param.")]
    params = {n: t["param." + n].double().requires_grad_(True) for n in names}
    model = RefGPT(params, int(meta["n_layer"]), int(meta["n_head"]), vocab)
    targets = t["targets"]
    report.require("targets include ignored positions", bool((targets < 0).any()))
    loss = model.loss(t["tokens"], targets)
    loss.backward()
    report.check("loss", rel_err(t["loss"], loss.detach().reshape(1)), tol)
    for n in names:
        ref = params[n].grad
        # A gradient that is zero in the reference would make the check vacuous.
        report.require(f"reference grad of {n} is non-zero", ref.norm().item() > 0)
        report.check(f"grad {n}", rel_err(t["grad." + n], ref), tol)
    if padded > vocab:
        dwte = t["grad.wte.weight"]
        report.require("padded rows of wte get exactly zero gradient",
                       bool((dwte[vocab:] == 0).all()))


def cosine_lr(step, lr, min_ratio, warmup, total):
    # LrSchedule (launch/schedule.hpp), written again here from its documentation.
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * min_ratio
    progress = min(max((step - warmup) / max(max(total - 1, 1) - warmup, 1), 0.0), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def check_training(runner, tmp, report):
    data = os.path.join(tmp, "corpus.txt")
    rng = np.random.default_rng(3)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home"]
    with open(data, "w") as f:
        f.write(" ".join(rng.choice(words, size=3000)))
    out = os.path.join(tmp, "train.safetensors")
    run([runner, "train", "--data", data, "--run", os.path.join(tmp, "run"), "--out", out])
    t, meta = read_safetensors(out)
    steps, accum = int(meta["steps"]), int(meta["grad_accum"])
    lr, wd, clip = float(meta["lr"]), float(meta["weight_decay"]), float(meta["grad_clip"])
    print(f"ten Trainer steps (fp32) vs torch.optim.AdamW, {steps} steps x {accum} micro-batches:")
    names = [k[len("init."):] for k in t if k.startswith("init.")]
    params = {n: t["init." + n].double().requires_grad_(True) for n in names}
    model = RefGPT(params, int(meta["n_layer"]), int(meta["n_head"]), int(meta["vocab_size"]))
    decay = [params[n] for n in names if params[n].dim() >= 2]
    no_decay = [params[n] for n in names if params[n].dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(float(meta["beta1"]), float(meta["beta2"])),
                            eps=float(meta["eps"]))
    losses, norms, lrs = [], [], []
    for s in range(steps):
        opt.zero_grad(set_to_none=False)
        total = 0.0
        for m in range(accum):
            i = s * accum + m
            loss = model.loss(t["inputs"][i], t["targets"][i])
            (loss / accum).backward()
            total += loss.item()
        losses.append(total / accum)
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item())
        step_lr = cosine_lr(s, lr, float(meta["min_lr_ratio"]), int(meta["warmup_steps"]), steps)
        lrs.append(step_lr)
        for g in opt.param_groups:
            g["lr"] = step_lr
        opt.step()
    report.check("learning rates", rel_err(t["lr"], torch.tensor(lrs)), 1e-6)
    report.check("losses, step by step", rel_err(t["loss"], torch.tensor(losses)), TOL_TRAIN_LOSS)
    report.check("grad norms before clipping", rel_err(t["grad_norm"], torch.tensor(norms)),
                 TOL_TRAIN_LOSS)
    report.require(f"clipping was active (norms {min(norms):.3f}..{max(norms):.3f} vs {clip})",
                   max(norms) > clip)
    report.require(f"loss fell ({losses[0]:.3f} -> {losses[-1]:.3f})", losses[-1] < losses[0])
    C = int(meta["n_embd"])
    for n in names:
        init = t["init." + n].double()
        ours = t["final." + n].double() - init
        ref = params[n].detach() - init
        if n.endswith("attn.c_attn.bias"):
            # The key bias adds q.b_k to every score of a softmax row, which the softmax ignores:
            # its true gradient is exactly zero, so what Adam does with it is rounding noise
            # divided by sqrt(v) + eps, different in float32 and float64. Check query and value
            # bias as usual, and that the key bias barely moves (an absolute bound: a real
            # gradient would move it by about lr per step, 1e-3 here).
            qv = torch.cat([ours[:C], ours[2 * C:]]), torch.cat([ref[:C], ref[2 * C:]])
            report.check(f"update of {n} (q, v)", rel_err(*qv), TOL_TRAIN_PARAMS)
            report.require(f"key bias in {n} stays put (|update| {ours[C:2 * C].norm():.1e})",
                           ours[C:2 * C].norm().item() < 1e-4)
            continue
        report.check(f"update of {n}", rel_err(ours, ref), TOL_TRAIN_PARAMS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runner", required=True)
    args = ap.parse_args()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="mt_gpt_torch_") as tmp:
        check_grads(args.runner, tmp, "fp32", 256, 256, TOL_FP32, report)
        check_grads(args.runner, tmp, "fp32", 300, 384, TOL_FP32, report)
        check_grads(args.runner, tmp, "bf16", 256, 256, TOL_BF16, report)
        check_grads(args.runner, tmp, "bf16", 300, 384, TOL_BF16, report)
        check_training(args.runner, tmp, report)
    if report.failures:
        print(f"\nFAILED: {len(report.failures)} check(s):")
        for f in report.failures:
            print("  " + f)
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
