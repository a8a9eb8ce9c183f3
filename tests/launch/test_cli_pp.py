"""`mpirun -np N meshtrain train --pp P` as a user runs it: in the fp32 policy PP = N (a
5-layer model: uneven stages) trains for 20 steps to the losses, gradient norms and weights
(model.safetensors, gathered from every stage) of one process on the same global batch, under
1f1b and gpipe; at 4 ranks also PP 2 x TP 2 and DP 2 x PP 2; rank 0 alone prints; the
end-of-training sample is the one-process sample; evaluation runs through the pipeline; bad
layouts (PP not dividing the ranks, more stages than layers, an unknown schedule) end the job
with a clear error before any step and leave no run directory behind. The interleaved schedule
(pp.virtual_stages = 2, 2N layers, N micro-batches) likewise matches one process, with
evaluation through the ring of chunks and traces that name each chunk ("F0.c1"); N layers, which
it cannot cut into 2N chunks, are refused naming the keys.
The Llama family the same way: llama-tiny with 5 layers at PP = N (tied LM head at 2 and 4 ranks,
untied at 3), and at 4 ranks PP 2 x TP 2 (untied, gpipe): losses, norms, weights and the sample
equal one process's; `meshtrain plan --pp 2` for llama-small prints both stages."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cli_tp import compare, expect_error, run, train, STEPS  # noqa: E402

FIVE = ("--set", "model.n_layer=5", "--set", "train.grad_clip=1.0")


def llama(meshtrain, mpi, n, loss_tol, param_tol):
    """llama-tiny under PP (and PP x TP at 4 ranks) against one process; plan --pp 2."""
    with tempfile.TemporaryDirectory() as tmp:
        d = lambda name: os.path.join(tmp, name)
        tie = "false" if n == 3 else "true"
        model = ("--set", "model.preset=llama-tiny", "--set", f"model.tie_embeddings={tie}", *FIVE)
        cases = [(f"llama PP = {n} (tied {tie})", ("--pp", str(n)), model, 2 * n + 1)]
        if n == 4:
            untied = ("--set", "model.preset=llama-tiny", "--set", "model.tie_embeddings=false", *FIVE)
            cases.append(("llama PP 2 x TP 2 (untied, gpipe)",
                          ("--pp", "2", "--tp", "2", "--set", "pp.schedule=gpipe"), untied, 3))
        for i, (what, layout, m, micro) in enumerate(cases):
            acc = ("--set", f"train.grad_accum={micro}")
            _, one = train([meshtrain], d(f"one{i}"), 1, (*m, *acc))
            out, pp = train(mpi, d(f"pp{i}"), 1, (*m, *acc, *layout))
            if out.count("done:") != 1:
                sys.exit(f"FAIL: {what}: expected one 'done:' line (rank 0 only), got:\n{out}")
            compare(what, one, d(f"one{i}"), pp, d(f"pp{i}"), loss_tol, param_tol)
            s1 = [r["sample"] for r in one if "sample" in r]
            s2 = [r["sample"] for r in pp if "sample" in r]
            if not s2 or s2 != s1:
                sys.exit(f"FAIL: {what}: sample {s2!r} differs from one process's {s1!r}")
    p = run([meshtrain, "plan", "--model", "llama-small", "--pp", "2", "--micro", "4"])
    stages = [l for l in p.stdout.splitlines() if l.strip().startswith(("0 ", "1 "))]
    if p.returncode != 0 or "pipeline: 2 stages" not in p.stdout or len(stages) != 2:
        sys.exit(f"FAIL: plan --pp 2 for llama-small:\n{p.stdout}\n{p.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    a = ap.parse_args()
    n = a.ranks
    mpi = a.mpiexec.split() + [str(n), a.meshtrain]
    loss_tol, param_tol = 1e-5, 2e-4
    with tempfile.TemporaryDirectory() as tmp:
        d = lambda name: os.path.join(tmp, name)
        m = 2 * n + 1
        acc = ("--set", f"train.grad_accum={m}")
        _, one = train([a.meshtrain], d("one"), 1, (*FIVE, *acc))
        one_sample = [r["sample"] for r in one if "sample" in r]
        for sched in ("1f1b", "gpipe"):
            out, pp = train(mpi, d(sched), 1, (*FIVE, *acc, "--pp", str(n), "--set", f"pp.schedule={sched}"))
            if out.count("done:") != 1:
                sys.exit(f"FAIL: expected one 'done:' line (rank 0 only), got:\n{out}")
            compare(f"PP = {n} {sched}", one, d("one"), pp, d(sched), loss_tol, param_tol)
            waits = [r for r in pp if "pipe_wait_ms" in r]
            if len(waits) != STEPS or any(r["pipe_compute_ms"] <= 0 or r["pipe_wait_ms"] < 0 for r in waits):
                sys.exit(f"FAIL: PP = {n}: expected pipe_wait_ms and pipe_compute_ms in every step's record")
            sample = [r["sample"] for r in pp if "sample" in r]
            if not sample or sample != one_sample:
                sys.exit(f"FAIL: PP = {n} sample {sample!r} differs from one process's {one_sample!r}")
        # Evaluation through the pipeline matches one process's.
        ev = ("--set", "data.val_fraction=0.1", "--set", "eval.every=10", "--set", "eval.batches=3")
        _, one_ev = train([a.meshtrain], d("one_ev"), 1, (*FIVE, *acc, *ev))
        _, pp_ev = train(mpi, d("pp_ev"), 1, (*FIVE, *acc, *ev, "--pp", str(n)))
        v1 = [r["val_loss"] for r in one_ev if "val_loss" in r]
        v2 = [r["val_loss"] for r in pp_ev if "val_loss" in r]
        if not v1 or len(v1) != len(v2) or any(abs(x - y) > 1e-5 * abs(x) for x, y in zip(v1, v2)):
            sys.exit(f"FAIL: validation losses under PP {v2} differ from one process's {v1}")
        if n == 4:
            _, one2 = train([a.meshtrain], d("one2"), 2, (*FIVE, "--set", "train.grad_accum=3"))
            _, pptp = train(mpi, d("pptp"), 2, (*FIVE, "--set", "train.grad_accum=3", "--pp", "2", "--tp", "2"))
            compare("PP 2 x TP 2", one2, d("one2"), pptp, d("pptp"), loss_tol, param_tol)
            _, dppp = train(mpi, d("dppp"), 1, (*FIVE, "--set", "train.grad_accum=3", "--pp", "2",
                                                "--set", "train.zero=1"))
            compare("DP 2 x PP 2, ZeRO-1", one2, d("one2"), dppp, d("dppp"), loss_tol, param_tol)
        # Interleaved: 2 chunks per stage of a 2N-layer model, M = N (every forward is warm-up).
        il = ("--set", f"model.n_layer={2 * n}", "--set", "train.grad_clip=1.0", "--set", f"train.grad_accum={n}",
              "--set", "data.val_fraction=0.1", "--set", "eval.every=10", "--set", "eval.batches=3")
        _, one_il = train([a.meshtrain], d("one_il"), 1, il)
        _, pp_il = train(mpi, d("pp_il"), 1, (*il, "--pp", str(n), "--set", "pp.schedule=interleaved",
                                             "--set", "pp.virtual_stages=2", "--set", "trace.steps=3"))
        compare(f"PP = {n} interleaved V = 2", one_il, d("one_il"), pp_il, d("pp_il"), loss_tol, param_tol)
        v1 = [r["val_loss"] for r in one_il if "val_loss" in r]
        v2 = [r["val_loss"] for r in pp_il if "val_loss" in r]
        if not v1 or len(v1) != len(v2) or any(abs(x - y) > 1e-5 * abs(x) for x, y in zip(v1, v2)):
            sys.exit(f"FAIL: validation losses under interleaved PP {v2} differ from one process's {v1}")
        with open(os.path.join(d("pp_il"), "traces", "rank-00000.json")) as f:
            names = {e.get("name") for e in json.load(f)["traceEvents"]}
        if not {"F0", "F0.c1", "B0.c1", "B0"} <= names:
            sys.exit(f"FAIL: the interleaved trace does not name each chunk: {sorted(n for n in names if n)[:20]}")
    never = "/tmp/meshtrain-pp-never"
    base = ["train", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32", "--set", f"run.dir={never}"]
    expect_error(mpi + base + ["--pp", str(n + 1)], f"train.pp = {n + 1}", "PP not dividing the ranks")
    # gpt-tiny has 2 layers.
    if n > 2:
        expect_error(mpi + base + ["--pp", str(n)], "model.n_layer", "more stages than layers")
    expect_error(mpi + base + ["--pp", "2", "--set", "pp.schedule=zigzag"], "pp.schedule", "unknown schedule")
    expect_error(mpi + base + ["--pp", str(n), "--set", f"model.n_layer={n}", "--set", "pp.schedule=interleaved",
                               "--set", "pp.virtual_stages=2", "--set", f"train.grad_accum={n}"],
                 "model.n_layer must be a multiple of pp.virtual_stages x train.pp", "N layers in 2N chunks")
    if os.path.exists(never):
        sys.exit("FAIL: a refused job left a run directory behind")
    llama(a.meshtrain, mpi, n, loss_tol, param_tol)
    print(f"ok: PP = {n} (GPT and Llama) matches one process over {STEPS} steps")


if __name__ == "__main__":
    main()
