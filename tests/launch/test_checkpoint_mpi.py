"""Checkpoints under mpirun, as a user runs them:
- resume is bit-exact under data parallelism and ZeRO-1 (fp32 and bf16): losses and final
  weights equal the uninterrupted run's;
- resharding: a checkpoint saved under one layout resumes under another (DP N -> 1, 1 -> N,
  ZeRO-1 on -> off and off -> on; at 2 ranks TP 2 -> 1 and 1 -> 2, and TP 2 resumes bit-exactly)
  with equal losses to float32 rounding;
- a rank SIGKILLed mid-step: mpirun ends the job, which exits non-zero naming the lost rank, and
  `--resume latest` continues to the uninterrupted run's losses and weights.

--selftimeout (Open MPI) runs only the rank-loss cases, with mpirun told not to end the job
(--mca orte_abort_on_non_zero_status 0, as under Slurm without --kill-on-bad-exit or Kubernetes),
so that the surviving ranks' own communication timeout must: rank 1 SIGKILLed, rank 0 (the
writer of the run directory) SIGKILLed, and the last rank frozen with SIGSTOP. Each time every
process of the job is gone within the timeout plus 10 s, the job exits non-zero, a survivor names
the lost rank, and `--resume latest` (never a half-written checkpoint) reproduces the
uninterrupted run bit-exactly."""
import argparse
import json
import os
import re
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


# The rank-loss runs. A step takes 2-3 ms here, so the run must be long for the kill, sent 50 ms
# after the first checkpoint's record, to land well before its end on a loaded machine: with 60
# steps the kill could land after the last collective, and then (mpirun leaving the job to the
# ranks) the survivors finished and Open MPI's mpirun waited forever for the killed rank (see
# docs/lost-ranks.md). 1000 steps take 3-5 s.
KILL_STEPS = 1000
KILL_CFG = ["--set", f"train.steps={KILL_STEPS}", "--set", "checkpoint.every=50",
            "--set", "train.precision=fp32"]


def alive(pid):
    """Whether pid is a process that has not exited (a zombie has)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def names_lost(line, rank):
    """Whether `line` is a collective timeout (comm/communicator_messages.cpp, timeout_message) that names
    group rank `rank` as lost: "[rank R, last seen at ..., did not answer a liveness check within
    T s: lost (...)]" for a rank that never arrived, "lost rank R: it posted it, then did not answer
    a liveness check" (or "Also lost: ...") for one that posted the collective and then went."""
    if "did not complete within" not in line or "did not answer a liveness check" not in line:
        return False
    name = rf"rank {rank}(?: \(world rank \d+\))?"
    other = r"rank \d+(?: \(world rank \d+\))?"
    return bool(re.search(rf"[\[;] ?{name}, [^;]*?: lost \(", line)
                or re.search(rf"[Ll]ost:? (?:{other}, )*{name}[,:.]", line))


def kill_and_resume(a, n, tmp, train, ref, what, flags, victim_rank, sig, timeout_s):
    """Starts the KILL_CFG run under mpirun with `flags`, sends `sig` to rank `victim_rank` mid-step,
    checks the job ends within timeout_s + 10 s, non-zero, naming the rank, then resumes it with
    --resume latest and compares with the uninterrupted run `ref`. Returns the seconds from the
    signal to the job's end."""
    d = os.path.join(tmp, "kill-" + "".join(c if c.isalnum() else "-" for c in what))
    cmd = a.mpiexec.split()[:1] + flags + a.mpiexec.split()[1:] + [str(n), a.meshtrain]
    args = cmd + ["train", "--quiet", *TINY, "--set", "train.batch_size=1", "--set", f"run.dir={d}", *KILL_CFG]
    env = dict(os.environ, MESHTRAIN_COMM_TIMEOUT=str(timeout_s))
    # A session of its own: on failure the whole job is killed, not mpirun alone.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)

    def fail_job(msg):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if victim is not None and alive(victim):
            os.kill(victim, signal.SIGKILL)
        fail(f"{what}: {msg}")

    # The victim's pid first (a scan of /proc takes a while on a busy machine), then the kill as
    # soon as the first checkpoint is recorded.
    victim = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and victim is None:
        victim = rank_pid(proc.pid, victim_rank)
        time.sleep(0.01)
    metrics = os.path.join(d, "metrics.jsonl")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and '"checkpoint"' in open(metrics).read():
            break
        time.sleep(0.01)
    time.sleep(0.05)  # into the middle of a later step
    if victim is None or proc.poll() is not None:
        fail_job(f"could not find rank {victim_rank} of a running job (exit {proc.poll()})")
    os.kill(victim, sig)
    t_kill = time.time()
    try:
        out, _ = proc.communicate(timeout=timeout_s + 10)
    except subprocess.TimeoutExpired:
        fail_job(f"the job was still running {timeout_s + 10} s after rank {victim_rank} got "
                 f"{signal.Signals(sig).name}")
    took = time.time() - t_kill
    if proc.returncode == 0:
        fail_job(f"the job exited 0 after rank {victim_rank} was lost:\n{out[-3000:]}")
    # mpirun's job is over; no process of it may be left, the frozen one included.
    until = time.time() + 5
    while alive(victim) and time.time() < until:
        time.sleep(0.05)
    if alive(victim):
        fail_job(f"rank {victim_rank} (pid {victim}) was left behind after the job ended")
    # mpirun names the rank that died. Left to the ranks, the survivors' collective times out and
    # names the lost rank (it never arrived, or it posted the collective and then did not answer
    # the liveness check).
    if flags:
        if not any(names_lost(line, victim_rank) for line in out.splitlines()):
            fail(f"{what}: no rank reported the collective timeout naming the lost rank "
                 f"{victim_rank}:\n{out[-3000:]}")
    elif f"rank {victim_rank}" not in out:
        fail(f"{what}: the output does not name the lost rank {victim_rank}:\n{out[-3000:]}")
    # The steps recorded (a killed rank 0 may have left a torn last line; the resume drops it).
    done = []
    for line in open(os.path.join(d, "metrics.jsonl")).read().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r:
            done.append(r["step"])
    if not done or done[-1] >= KILL_STEPS:
        fail(f"{what}: the job was not interrupted (steps {done[:1]}..{done[-1:]})")
    train(a.mpi, d, 1, KILL_CFG, resume="latest")
    compare_losses(losses(ref), losses(d), range(1, KILL_STEPS + 1), what=f"{what}: resumed after the kill")
    if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
        fail(f"{what}: final weights after the kill and resume differ")
    left = [f for f in os.listdir(os.path.join(d, "checkpoints")) if not f.startswith("step_")]
    if left:
        fail(f"{what}: the resumed run left {left} in the checkpoint directory")
    print(f"{what}: down {took:.1f} s after {signal.Signals(sig).name} to rank {victim_rank} (exit "
          f"{proc.returncode}; timeout {timeout_s} s), stopped at step {done[-1]}, resumed to the "
          f"uninterrupted losses and weights")
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True, help="mpiexec and its flags up to the process count flag")
    ap.add_argument("--ranks", type=int, required=True)
    ap.add_argument("--selftimeout", action="store_true", help="only the rank-loss cases, with Open "
                    "MPI's mpirun told not to end the job itself, so that the ranks' own timeout must")
    a = ap.parse_args()
    n = a.ranks
    mpi = a.mpiexec.split() + [str(n), a.meshtrain]
    a.mpi = mpi
    one = [a.meshtrain]

    def train(cmd, run_dir, batch, extra=(), resume=None, expect_ok=True):
        args = cmd + ["train", "--quiet", *TINY, "--set", f"train.batch_size={batch}",
                      "--set", f"run.dir={run_dir}", *extra]
        if resume:
            args += ["--resume", resume]
        return run(args, expect_ok=expect_ok)

    def step4(d):
        return os.path.join(d, "checkpoints", "step_00000004")

    if a.selftimeout:
        timeout_s = 10
        flags = ["--mca", "orte_abort_on_non_zero_status", "0"]
        with tempfile.TemporaryDirectory() as tmp:
            ref = os.path.join(tmp, "kill-ref")
            train(mpi, ref, 1, KILL_CFG)
            took = [kill_and_resume(a, n, tmp, train, ref, f"rank {r} {signal.Signals(sig).name}, the ranks' "
                                    "timeout ends the job", flags, r, sig, timeout_s)
                    for r, sig in ((1, signal.SIGKILL), (0, signal.SIGKILL), (n - 1, signal.SIGSTOP))]
        print(f"ok: {n} ranks, mpirun leaving the job to the ranks: rank 1 killed, rank 0 killed, rank "
              f"{n - 1} stopped: down in {', '.join(f'{t:.1f}' for t in took)} s (limit {timeout_s + 10} s), "
              "resumed bit-exactly")
        return

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
        ref = os.path.join(tmp, "kill-ref")
        train(mpi, ref, 1, KILL_CFG)
        kill_and_resume(a, n, tmp, train, ref, "mpirun ends the job", [], 1, signal.SIGKILL, 10)
    print(f"ok: {n} ranks: bit-exact resume (DP, ZeRO-1; fp32, bf16), 6 reshardings, rank loss and resume")


if __name__ == "__main__":
    main()
