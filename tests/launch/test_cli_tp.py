"""`mpirun -np N meshtrain train --tp K` as a user runs it: in the fp32 policy TP = K (and
DP = N/K x TP = K, with ZeRO-1) trains for 20 steps to the losses and weights (model.safetensors,
gathered over TP) of one process with the same global batch; bf16 agrees within tolerance;
`mpirun -np K meshtrain generate` gives the one-process text from the same run directory; a model
whose heads cannot be split, or a process count that --tp does not divide, ends the job with a
clear error instead of a hang; gradient accumulation under TP matches too; sequence parallelism
(tp.sequence_parallel) matches one process at TP 2 with accumulation (GPT and llama-tiny), TP 4,
DP 2 x TP 2 and PP 2 x TP 2 with less activation memory, and is refused where the sequence does not split;
`plan --tp` shows a DP x TP layout's memory per rank."""
import argparse
import array
import json
import os
import struct
import subprocess
import sys
import tempfile

STEPS = 20


def run(args, timeout=240):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    return p


def train(cmd, run_dir, batch, extra=()):
    args = cmd + ["train", "--quiet", "--set", "model.preset=gpt-tiny", "--set", f"train.steps={STEPS}",
                  "--set", f"train.batch_size={batch}", "--set", "train.seq_len=32",
                  "--set", "train.precision=fp32", "--set", "train.threads=1",
                  "--set", "sample.tokens=24", "--set", "eval.every=0", "--set", "data.val_fraction=0",
                  "--set", f"run.dir={run_dir}", *extra]
    p = run(args)
    if p.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return p.stdout, rows


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            sys.exit(f"FAIL: {path}: {name} is {t['dtype']}, expected F32 master weights")
        a = array.array("f")
        a.frombytes(data[t["data_offsets"][0]:t["data_offsets"][1]])
        out[name] = (t["shape"], a)
    return out


def compare(label, ref_rows, ref_dir, rows, run_dir, loss_tol, param_tol):
    l1 = [r["loss"] for r in ref_rows if "loss" in r]
    l2 = [r["loss"] for r in rows if "loss" in r]
    n1 = [r["grad_norm"] for r in ref_rows if "grad_norm" in r]
    n2 = [r["grad_norm"] for r in rows if "grad_norm" in r]
    if len(l1) != STEPS or len(l2) != STEPS:
        sys.exit(f"FAIL: {label}: step counts {len(l1)} and {len(l2)}")
    for s, (x, y) in enumerate(zip(l1, l2)):
        if abs(x - y) > loss_tol * abs(x):
            sys.exit(f"FAIL: {label}: step {s + 1} loss {y}, one process {x}")
    for s, (x, y) in enumerate(zip(n1, n2)):
        if abs(x - y) > 10 * loss_tol * abs(x):
            sys.exit(f"FAIL: {label}: step {s + 1} gradient norm {y}, one process {x}")
    if param_tol is None:
        return
    w1 = load_safetensors(os.path.join(ref_dir, "model.safetensors"))
    w2 = load_safetensors(os.path.join(run_dir, "model.safetensors"))
    if sorted(w1) != sorted(w2):
        sys.exit(f"FAIL: {label}: tensor names differ")
    worst, at = 0.0, ""
    for name, (shape, a) in w1.items():
        shape2, b = w2[name]
        if shape != shape2:
            sys.exit(f"FAIL: {label}: {name} has shape {shape2}, one process {shape}")
        d = max(abs(x - y) for x, y in zip(a, b))
        if d > worst:
            worst, at = d, name
    if worst > param_tol:
        sys.exit(f"FAIL: {label}: weights differ by {worst} in {at} (tolerance {param_tol})")


def expect_error(args, needle, label):
    p = run(args, timeout=120)
    if p.returncode == 0 or needle not in p.stderr:
        sys.exit(f"FAIL: {label}: expected a non-zero exit naming '{needle}':\n{p.stdout}\n{p.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True, help="mpiexec and its flags up to the process count flag, one string")
    ap.add_argument("--ranks", type=int, required=True)
    a = ap.parse_args()
    n = a.ranks
    mpi = a.mpiexec.split() + [str(n), a.meshtrain]
    # Adam turns a gradient's float32 rounding into up to a fraction of one step (lr 1e-3).
    loss_tol, param_tol = 1e-5, 1e-4
    six_heads = ("--set", "model.n_head=6", "--set", "model.n_embd=48")
    sp = ("--set", "tp.sequence_parallel=true")
    with tempfile.TemporaryDirectory() as tmp:
        d = lambda name: os.path.join(tmp, name)
        # TP = N; a 6-head model at 3 ranks (the 4-head gpt-tiny does not split 3 ways).
        model = six_heads if n == 3 else ()
        _, one = train([a.meshtrain], d("one"), 4, model)
        out, tp = train(mpi, d("tp"), 4, ("--tp", str(n), *model))
        if out.count("done:") != 1:
            sys.exit(f"FAIL: expected one 'done:' line (rank 0 only), got:\n{out}")
        compare(f"TP = {n}", one, d("one"), tp, d("tp"), loss_tol, param_tol)
        if not [r for r in tp if "sample" in r and r["sample"]]:
            sys.exit("FAIL: no end-of-training sample under TP")
        if n == 4:
            # DP = 2 x TP = 2, plain and with ZeRO-1 over the DP group.
            _, dptp = train(mpi, d("dptp"), 2, ("--tp", "2"))
            compare("DP 2 x TP 2", one, d("one"), dptp, d("dptp"), loss_tol, param_tol)
            _, zero = train(mpi, d("zero"), 2, ("--tp", "2", "--set", "train.zero=1"))
            compare("DP 2 x TP 2, ZeRO-1", one, d("one"), zero, d("zero"), loss_tol, param_tol)
            # Sequence parallelism: TP = 4 (each rank a quarter of the 4 x 32 tokens), DP 2 x TP 2,
            # and PP 2 x TP 2 (the stage boundary is the token shard), all as one process.
            _, sp4 = train(mpi, d("sp4"), 4, ("--tp", "4", *sp))
            compare("TP 4, sequence parallel", one, d("one"), sp4, d("sp4"), loss_tol, param_tol)
            _, spdp = train(mpi, d("spdp"), 2, ("--tp", "2", *sp))
            compare("DP 2 x TP 2, sequence parallel", one, d("one"), spdp, d("spdp"), loss_tol,
                    param_tol)
            _, sppp = train(mpi, d("sppp"), 4, ("--tp", "2", "--pp", "2", *sp))
            compare("PP 2 x TP 2, sequence parallel", one, d("one"), sppp, d("sppp"), loss_tol,
                    param_tol)
        if n == 2:
            # Gradient accumulation under TP: 2 micro-steps of 2 rows match one process.
            acc = ("--set", "train.grad_accum=2")
            _, one_acc = train([a.meshtrain], d("one_acc"), 2, acc)
            _, tp_acc = train(mpi, d("tp_acc"), 2, ("--tp", "2", *acc))
            compare("TP 2, accumulation", one_acc, d("one_acc"), tp_acc, d("tp_acc"), loss_tol, param_tol)
            # Sequence parallelism with accumulation (each micro-batch's LayerNorm gradients
            # summed over the group once), and its smaller activation record.
            _, sp_acc = train(mpi, d("sp_acc"), 2, ("--tp", "2", *acc, *sp))
            compare("TP 2, accumulation, sequence parallel", one_acc, d("one_acc"), sp_acc,
                    d("sp_acc"), loss_tol, param_tol)
            act = lambda rows: max(r.get("memory", {}).get("activation_bytes", 0) for r in rows)
            if not 0 < act(sp_acc) < act(tp_acc):
                sys.exit(f"FAIL: sequence parallel activations {act(sp_acc)} bytes, not below "
                         f"{act(tp_acc)} without it")
            # The Llama family (llama-tiny: RMSNorm, rotary, 2 KV heads) the same way: one
            # process's losses and weights, a sample, and a smaller activation record.
            llama = ("--set", "model.preset=llama-tiny")
            _, one_lacc = train([a.meshtrain], d("one_lacc"), 2, (*llama, *acc))
            _, tp_lacc = train(mpi, d("tp_lacc"), 2, ("--tp", "2", *llama, *acc))
            _, sp_lacc = train(mpi, d("sp_lacc"), 2, ("--tp", "2", *llama, *acc, *sp))
            compare("llama-tiny TP 2, accumulation, sequence parallel", one_lacc, d("one_lacc"),
                    sp_lacc, d("sp_lacc"), loss_tol, param_tol)
            if not [r for r in sp_lacc if r.get("sample")]:
                sys.exit("FAIL: no end-of-training sample from llama-tiny under sequence parallelism")
            if not 0 < act(sp_lacc) < act(tp_lacc):
                sys.exit(f"FAIL: llama-tiny sequence parallel activations {act(sp_lacc)} bytes, not "
                         f"below {act(tp_lacc)} without it")
        # bf16: within tolerance of the one-process bf16 run.
        _, one16 = train([a.meshtrain], d("one16"), 4, (*model, "--set", "train.precision=bf16"))
        _, tp16 = train(mpi, d("tp16"), 4, ("--tp", str(n), *model, "--set", "train.precision=bf16"))
        compare(f"bf16 TP = {n}", one16, d("one16"), tp16, d("tp16"), 2e-2, None)
        # Generation from the same weights: split N ways, the same text as one process.
        gen = ["generate", "--run", d("tp"), "--tokens", "40", "--prompt", "Q: ", "--seed", "3"]
        g1 = run([a.meshtrain] + gen)
        gn = run(mpi + gen)
        if g1.returncode != 0 or gn.returncode != 0 or g1.stdout != gn.stdout or len(g1.stdout) < 40:
            sys.exit(f"FAIL: generate under mpirun -np {n} differs from one process:\n"
                     f"{g1.stdout!r} {g1.stderr}\n{gn.stdout!r} {gn.stderr}")
    if n == 3:
        # Sequence parallelism needs the 32 positions to split 3 ways: refused, naming the keys.
        expect_error(mpi + ["train", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32",
                            "--set", "run.dir=/tmp/meshtrain-tp-never", *six_heads, "--tp", "3",
                            *sp],
                     "train.seq_len (32) must be a multiple of train.tp (3)",
                     "sequence parallelism with a sequence that does not split")
    # A model whose heads do not divide by TP is refused at start-up on every rank.
    bad_heads = ("--set", "model.n_head=5", "--set", "model.n_embd=40") if n != 3 else ()
    expect_error(mpi + ["train", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32",
                        "--set", "run.dir=/tmp/meshtrain-tp-never", *bad_heads, "--tp", str(n)],
                 "cannot be split across", "unsplittable heads")
    # A process count that --tp does not divide.
    expect_error(mpi + ["train", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32",
                        "--set", "run.dir=/tmp/meshtrain-tp-never", "--tp", str(n + 1)],
                 f"needs a multiple of {n + 1} ranks", "TP size that does not divide the ranks")
    # One process cannot hold a TP group.
    expect_error([a.meshtrain, "train", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32",
                  "--set", "run.dir=/tmp/meshtrain-tp-never", "--tp", "2"],
                 "needs a multiple of 2 ranks", "--tp 2 without mpirun")
    # plan shows the per-rank memory of a DP x TP layout, and refuses one that cannot split.
    p = run([a.meshtrain, "plan", "--model", "gpt2", "--dp", "2", "--tp", str(n if n != 3 else 4)])
    if p.returncode != 0 or "per rank under TP" not in p.stdout or "DP 2 x TP" not in p.stdout:
        sys.exit(f"FAIL: plan --tp:\n{p.stdout}\n{p.stderr}")
    p = run([a.meshtrain, "plan", "--model", "gpt2", "--tp", "5"])
    if p.returncode == 0 or "cannot be split" not in p.stderr:
        sys.exit(f"FAIL: plan --tp 5 on a 12-head model should be refused:\n{p.stdout}\n{p.stderr}")
    if os.path.exists("/tmp/meshtrain-tp-never"):
        sys.exit("FAIL: a refused job left a run directory behind")
    print(f"ok: TP = {n} matches one process over {STEPS} steps")


if __name__ == "__main__":
    main()
