"""Checkpoints under mpirun, as a user runs them:
- resume is bit-exact under data parallelism and ZeRO-1 (fp32 and bf16): losses and final
  weights equal the uninterrupted run's;
- resharding: a checkpoint saved under one layout resumes under another (DP N -> 1, 1 -> N,
  ZeRO-1 on -> off and off -> on; at 2 ranks TP 2 -> 1 and 1 -> 2, and TP 2 resumes bit-exactly)
  with equal losses to float32 rounding;
- a rank SIGKILLed mid-step: every other rank is gone within the communication timeout plus
  10 s, the job exits non-zero naming the lost rank, and `--resume latest` continues to the
  uninterrupted run's losses."""
import argparse
import os
import signal
import subprocess
import tempfile
import time

from ckpt_util import (TINY, compare_losses, fail, losses, max_weight_diff, run, same_weights)


def rank_pid(root_pid, rank):
    """The pid of MPI rank `rank` among the descendants of root_pid (Open MPI or a PMI launcher)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    todo, found = [root_pid], []
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            todo.append(c)
            try:
                env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"OMPI_COMM_WORLD_RANK={rank}".encode() in env or f"PMI_RANK={rank}".encode() in env:
                found.append(c)
    # The rank itself is the deepest match (a PMI proxy may carry the variable too).
    return found[-1] if found else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True, help="mpiexec and its flags up to the process count flag")
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--openmpi", action="store_true", help="also run the kill test with mpirun told "
                    "not to end the job itself, so that the ranks' own timeout must")
    a = ap.parse_args()
    n = a.ranks
    mpi = a.mpiexec.split() + [str(n), a.meshtrain]
    one = [a.meshtrain]

    def train(cmd, run_dir, batch, extra=(), resume=None, expect_ok=True):
        args = cmd + ["train", "--quiet", *TINY, "--set", f"train.batch_size={batch}",
                      "--set", f"run.dir={run_dir}", *extra]
        if resume:
            args += ["--resume", resume]
        return run(args, expect_ok=expect_ok)

    def step4(d):
        return os.path.join(d, "checkpoints", "step_00000004")

    with tempfile.TemporaryDirectory() as tmp:
        base = ("--set", "train.steps=8", "--set", "checkpoint.every=4")
        # 1. Bit-exact resume under the same layout: DP and ZeRO-1, fp32 and bf16.
        refs = {}
        for precision in ("fp32", "bf16"):
            for zero in (0, 1):
                name = f"{precision}-zero{zero}"
                cfg = base + ("--set", f"train.precision={precision}", "--set", f"train.zero={zero}")
                ref = os.path.join(tmp, f"ref-{name}")
                train(mpi, ref, 1, cfg)
                files = sorted(os.listdir(step4(ref)))
                want = ["config.toml", "manifest.json"] + [f"shard-{r:05}.safetensors" for r in range(n)]
                if files != want:
                    fail(f"{name}: checkpoint files {files}, expected one shard per rank {want}")
                res = os.path.join(tmp, f"res-{name}")
                train(mpi, res, 1, resume=step4(ref))
                compare_losses(losses(ref), losses(res), range(5, 9), what=f"DP {n} {name} resume")
                if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(res, "model.safetensors")):
                    fail(f"DP {n} {name}: final weights after resuming differ")
                refs[name] = ref
        # 2. Resharding (fp32): the same global batch on another layout; equal to float32 rounding.
        single = os.path.join(tmp, "single")
        train(one, single, n, base + ("--set", "train.precision=fp32"))
        cases = [
            ("DP N -> 1", one, n, refs["fp32-zero0"], ()),
            ("DP N ZeRO-1 -> 1", one, n, refs["fp32-zero1"], ()),
            ("ZeRO-1 on -> off", mpi, 1, refs["fp32-zero1"], ("--set", "train.zero=0")),
            ("ZeRO-1 off -> on", mpi, 1, refs["fp32-zero0"], ("--set", "train.zero=1")),
            ("DP 1 -> N ZeRO-1", mpi, 1, single, ("--set", "train.zero=1")),
            ("DP 1 -> N", mpi, 1, single, ()),
        ]
        for i, (what, cmd, batch, src, extra) in enumerate(cases):
            d = os.path.join(tmp, f"reshard{i}")
            train(cmd, d, batch, extra, resume=step4(src))
            compare_losses(losses(src), losses(d), range(5, 9), rel=2e-5, what=what)
            diff = max_weight_diff(os.path.join(src, "model.safetensors"), os.path.join(d, "model.safetensors"))
            if diff > 1e-5:
                fail(f"{what}: final weights differ by up to {diff}")

        # Tensor parallelism (2 ranks: TP = 2; 4 heads split 2 ways): bit-exact resume under
        # TP 2, and TP 2 -> 1 and 1 -> 2 (the global batch is one row per DP rank).
        if n == 2:
            tp_cfg = base + ("--set", "train.precision=fp32", "--set", "train.tp=2")
            tp_ref = os.path.join(tmp, "tp-ref")
            train(mpi, tp_ref, 1, tp_cfg)
            tp_res = os.path.join(tmp, "tp-res")
            train(mpi, tp_res, 1, resume=step4(tp_ref))
            compare_losses(losses(tp_ref), losses(tp_res), range(5, 9), what="TP 2 resume")
            if not same_weights(os.path.join(tp_ref, "model.safetensors"), os.path.join(tp_res, "model.safetensors")):
                fail("TP 2: final weights after resuming differ")
            one_ref = os.path.join(tmp, "tp-one-ref")
            train(one, one_ref, 1, base + ("--set", "train.precision=fp32"))
            for what, cmd, src, extra in (("TP 2 -> 1", one, tp_ref, ("--set", "train.tp=1")),
                                          ("TP 1 -> 2", mpi, one_ref, ("--set", "train.tp=2"))):
                d = os.path.join(tmp, what.replace(" ", "").replace(">", ""))
                train(cmd, d, 1, extra, resume=step4(src))
                compare_losses(losses(src), losses(d), range(5, 9), rel=2e-5, what=what)
                diff = max_weight_diff(os.path.join(src, "model.safetensors"), os.path.join(d, "model.safetensors"))
                if diff > 1e-5:
                    fail(f"{what}: final weights differ by up to {diff}")

        # 3. A rank SIGKILLed mid-step, then --resume latest.
        timeout_s = 10
        env = dict(os.environ, MESHTRAIN_COMM_TIMEOUT=str(timeout_s))
        cfg = ["--set", "train.steps=60", "--set", "checkpoint.every=10", "--set", "train.precision=fp32"]
        ref = os.path.join(tmp, "kill-ref")
        train(mpi, ref, 1, cfg)
        variants = [("mpirun ends the job", [])]
        if a.openmpi:
            variants.append(("the ranks' timeout ends the job", ["--mca", "orte_abort_on_non_zero_status", "0"]))
        for v, (what, flags) in enumerate(variants):
            d = os.path.join(tmp, f"kill{v}")
            cmd = a.mpiexec.split()[:1] + flags + a.mpiexec.split()[1:] + [str(n), a.meshtrain]
            args = cmd + ["train", "--quiet", *TINY, "--set", "train.batch_size=1", "--set", f"run.dir={d}", *cfg]
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            metrics = os.path.join(d, "metrics.jsonl")
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(metrics) and '"checkpoint"' in open(metrics).read():
                    break
                time.sleep(0.01)
            time.sleep(0.05)  # into the middle of a later step
            victim = rank_pid(proc.pid, 1)
            if victim is None or proc.poll() is not None:
                fail(f"{what}: could not find rank 1 of a running job (exit {proc.poll()})")
            os.kill(victim, signal.SIGKILL)
            t_kill = time.time()
            try:
                out, _ = proc.communicate(timeout=timeout_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                fail(f"{what}: the job was still running {timeout_s + 10} s after rank 1 was killed")
            took = time.time() - t_kill
            if proc.returncode == 0:
                fail(f"{what}: the job exited 0 after rank 1 was killed:\n{out[-3000:]}")
            # mpirun names the rank that died. Left to the ranks, the survivors' collective times
            # out and names rank 1 as lost (it never arrived, or it posted the collective and
            # then did not answer the liveness check).
            if flags:
                if "did not complete within" not in out or "did not answer a liveness check" not in out:
                    fail(f"{what}: no rank reported the collective timeout naming the lost rank:\n{out[-3000:]}")
            elif "rank 1" not in out:
                fail(f"{what}: the output does not name the lost rank 1:\n{out[-3000:]}")
            done = sorted(losses(d))
            if not done or done[-1] >= 60:
                fail(f"{what}: the job was not interrupted (steps {done[:1]}..{done[-1:]})")
            train(mpi, d, 1, cfg, resume="latest")
            compare_losses(losses(ref), losses(d), range(1, 61), what=f"{what}: resumed after the kill")
            if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
                fail(f"{what}: final weights after the kill and resume differ")
            print(f"{what}: down {took:.1f} s after the kill (exit {proc.returncode}), killed at step "
                  f"{done[-1]}, resumed to the uninterrupted losses")
    print(f"ok: {n} ranks: bit-exact resume (DP, ZeRO-1; fp32, bf16), 6 reshardings, rank loss and resume")


if __name__ == "__main__":
    main()
