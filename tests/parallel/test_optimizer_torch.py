#!/usr/bin/python3
"""parallel::DistributedAdamW against torch.optim.AdamW, on the same weights and gradients.

optimizer_runner (tests/parallel/optimizer_runner.cpp) runs five steps (decay on 2-D weights
only, clipping to 1.0, a learning rate per step) and writes the initial weights, every step's
gradients, the norms and the final master weights; this script redoes them with
torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ in float64 and compares:

  1. the gradient norms before clipping (relative 1e-6: ours sums in fp64 too);
  2. every tensor's update (final - initial), norm-wise relative, TOL_UPDATE;
  3. with bf16 parameters, that they are the master weights' rounding to bfloat16.

  test_optimizer_torch.py --runner PATH/optimizer_runner
"""
import argparse
import json
import struct
import subprocess
import sys
import tempfile

import numpy as np
import torch

torch.set_num_threads(1)

# Our update is float32 arithmetic in torch's operation order; float64 differs by the rounding
# of a few float32 operations per element, which Adam's division by sqrt(v) amplifies where v is
# small: up to 3e-6 here, and 1e-5 leaves a margin of three.
TOL_UPDATE = 1e-5
TOL_NORM = 1e-6


def read_safetensors(path):
    """A minimal reader (the safetensors package is not a Debian package): name -> tensor."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        if e["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} has dtype {e['dtype']}, expected F32")
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[8 + n + b:8 + n + end], dtype=np.float32)
        out[name] = torch.from_numpy(arr.reshape(e["shape"]).copy())
    return out, meta


def rel_err(ours, ref):
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(runner, tmp, params_dtype):
    path = f"{tmp}/opt_{params_dtype}.safetensors"
    subprocess.run([runner, "--params", params_dtype, "--out", path], check=True)
    t, meta = read_safetensors(path)
    names = [k[len("init."):] for k in t if k.startswith("init.")]
    params = {n: t["init." + n].double().clone().requires_grad_(True) for n in names}
    decay = [params[n] for n in names if params[n].dim() == 2]
    no_decay = [params[n] for n in names if params[n].dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(meta["weight_decay"])},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1.0, betas=(float(meta["beta1"]), float(meta["beta2"])),
                            eps=float(meta["eps"]))
    failures = []
    norms = []
    for step in range(1, int(meta["steps"]) + 1):
        for n in names:
            params[n].grad = t[f"grad.{step}.{n}"].double()
        norms.append(torch.nn.utils.clip_grad_norm_(list(params.values()),
                                                    float(meta["grad_clip"])).item())
        for g in opt.param_groups:
            g["lr"] = t["lr"][step - 1].item()
        opt.step()
    err = rel_err(t["norm"], torch.tensor(norms))
    print(f"{params_dtype} parameters: norms {err:.2e} (tolerance {TOL_NORM:.0e})")
    if err > TOL_NORM:
        failures.append(f"{params_dtype}: norms differ by {err:.2e}")
    if max(norms) <= float(meta["grad_clip"]):
        failures.append(f"{params_dtype}: clipping was never active (norms {norms})")
    for n in names:
        init = t["init." + n].double()
        err = rel_err(t["final." + n].double() - init, params[n].detach() - init)
        print(f"  update of {n}: {err:.2e} (tolerance {TOL_UPDATE:.0e})")
        if err > TOL_UPDATE:
            failures.append(f"{params_dtype}: update of {n} differs by {err:.2e}")
        want = t["final." + n]
        if params_dtype == "bf16":
            want = want.to(torch.bfloat16).float()
        if not torch.equal(t["param." + n], want):
            failures.append(f"{params_dtype}: the parameters {n} are not the master weights'"
                            f" {'rounding' if params_dtype == 'bf16' else 'copy'}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runner", required=True)
    args = ap.parse_args()
    failures = []
    with tempfile.TemporaryDirectory(prefix="mt_opt_torch_") as tmp:
        for params_dtype in ("fp32", "bf16"):
            failures += check(args.runner, tmp, params_dtype)
    if failures:
        print(f"\nFAILED: {len(failures)} check(s):")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
