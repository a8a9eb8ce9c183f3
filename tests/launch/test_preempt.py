"""Graceful preemption (launch/preemption.hpp) under mpirun, as a user and a cluster send signals:
- SIGTERM to mpirun (Open MPI 4.1 passes it on as SIGCONT, then SIGTERM after
  odls_base_sigkill_timeout seconds, then SIGKILL after as many, and exits 1 whatever the ranks
  return), SIGUSR1 to mpirun (which forwards it at once: `scancel --signal=USR1`, `sbatch
  --signal`), SIGTERM to one rank only (the last: the others learn it through the per-step
  agreement), and SIGTERM to launch/mtrun (which passes SIGUSR1 to mpirun);
- every rank stops after the same step, the job writes the checkpoint of that step and exits with
  status 75 (mpirun's 1 when mpirun itself was signalled) within a bound (the step in flight and the checkpoint write: seconds here), recording
  {"stopped": SIGNAL, "checkpoint": DIR} in metrics.jsonl;
- `--resume auto` then ends with the losses and final weights of a run that never stopped, bit
  for bit.
With --ranks 1 (one process, no mpirun): SIGINT (Ctrl-C) saves and exits 75, Ctrl-C twice stops
at once (killed by SIGINT), checkpoint.on_signal = never stops without a checkpoint and always
writes one though checkpoint.every = 0."""
import argparse
import json
import os
import signal
import subprocess
import tempfile
import time

from ckpt_util import TINY, compare_losses, fail, losses, run, same_weights, why
from test_checkpoint_mpi import alive, rank_pid

# Long enough that the signal, sent once a few steps are logged, lands well before the end on a
# loaded machine (a step takes 2-20 ms here).
STEPS = 1500
CFG = [*TINY, "--set", "train.batch_size=1", "--set", f"train.steps={STEPS}", "--set",
       "checkpoint.every=500", "--set", "train.precision=fp32", "--set", "checkpoint.keep=0"]
# The step in flight and a checkpoint of gpt-tiny take milliseconds; the bound leaves room for a
# machine loaded 10-20 deep.
BOUND_S = 30
# mpirun's wait between SIGCONT and SIGTERM, and SIGTERM and SIGKILL (launch/mtrun --stop-timeout).
SIGKILL_TIMEOUT = ["--mca", "odls_base_sigkill_timeout", "5"]
MTRUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "launch", "mtrun")


def steps_logged(d):
    try:
        return sum(1 for line in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in line)
    except OSError:
        return 0


def records(d):
    out = []
    for line in open(os.path.join(d, "metrics.jsonl")):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def start(cmd, d, extra=(), env=None):
    return subprocess.Popen(cmd + ["train", "--quiet", *CFG, "--set", f"run.dir={d}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)


def stop_and_check(proc, d, what, send, ranks, status=75, steps=STEPS):
    """Waits for 20 logged steps, calls send(proc), then checks the job's end: status 75 within
    BOUND_S, every process gone, one stopped record naming the checkpoint of the stop step, which
    is complete. Returns (stop step, seconds from the signal to the end)."""
    # The ranks' pids first (a scan of /proc takes a while on a busy machine), then the signal
    # once 20 steps are logged.
    deadline = time.time() + 180
    pids = [None] * ranks
    while time.time() < deadline and proc.poll() is None and None in pids:
        pids = [rank_pid(proc.pid, r) for r in range(ranks)] if ranks > 1 else [proc.pid]
    while time.time() < deadline and proc.poll() is None and steps_logged(d) < 20:
        time.sleep(0.01)
    if proc.poll() is not None:
        fail(f"{what}: the job ended ({proc.returncode}) before the signal\n{why(proc.stdout.read())}")
    proc.victim = pids[-1]
    steps_at_signal = steps_logged(d)
    t0 = time.time()
    send(proc)
    try:
        out, _ = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        fail(f"{what}: the job was still running {BOUND_S} s after the signal")
    took = time.time() - t0
    if proc.returncode != status:
        fail(f"{what}: exit status {proc.returncode}, expected {status} ({steps_logged(d)} steps "
             f"logged, {steps_at_signal} when the signal was sent)\n{why(out)}")
    until = time.time() + 5
    while any(p is not None and alive(p) for p in pids) and time.time() < until:
        time.sleep(0.05)
    if any(p is not None and alive(p) for p in pids):
        fail(f"{what}: a rank outlived the job")
    stopped = [r for r in records(d) if "stopped" in r]
    if len(stopped) != 1:
        fail(f"{what}: expected one stopped record in metrics.jsonl, got {stopped}\n{why(out)}")
    step = stopped[0]["step"]
    ck = stopped[0]["checkpoint"]
    if not (20 <= step < steps) or ck is None or not ck.endswith(f"step_{step:08}"):
        fail(f"{what}: stopped at step {step} with checkpoint {ck}")
    if not os.path.exists(os.path.join(ck, "manifest.json")):
        fail(f"{what}: the checkpoint {ck} is not complete")
    logged = max(r["step"] for r in records(d) if "loss" in r)
    if logged != step:
        fail(f"{what}: steps were logged up to {logged}, the job stopped after {step}")
    if "stopped by" not in out:
        fail(f"{what}: rank 0 did not say it stopped:\n{why(out)}")
    return step, took


def resume_matches(cmd, d, ref, what):
    run(cmd + ["train", "--quiet", *CFG, "--set", f"run.dir={d}", "--resume", "auto"])
    compare_losses(losses(ref), losses(d), range(1, STEPS + 1), what=what)
    if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
        fail(f"{what}: final weights after the stop and resume differ from the uninterrupted run's")


def single_process(mt, tmp):
    ref = os.path.join(tmp, "ref1")
    run([mt, "train", "--quiet", *CFG, "--set", f"run.dir={ref}"])
    d = os.path.join(tmp, "sigint")
    step, took = stop_and_check(start([mt], d), d, "SIGINT", lambda p: p.send_signal(signal.SIGINT), 1)
    resume_matches([mt], d, ref, "SIGINT then --resume auto")
    print(f"ok: SIGINT: stopped after step {step}, saved, exit 75 in {took:.2f} s; resumed bit-exactly")

    # Ctrl-C twice: the second ends the process at once, by SIGINT's default action. (gpt-small:
    # a step of a second or so, so that the second Ctrl-C comes before the first stop is done.)
    d = os.path.join(tmp, "twice")
    proc = start([mt], d, ["--set", "model.preset=gpt-small", "--set", "train.seq_len=256",
                           "--set", "train.batch_size=4"])
    while proc.poll() is None and steps_logged(d) < 2:
        time.sleep(0.01)
    # (A signal that arrives while the same one is pending merges with it: the second waits for
    # the first to be handled.)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        fail("Ctrl-C twice: still running")
    if proc.returncode != -signal.SIGINT or "SIGINT again: stopping at once" not in out:
        fail(f"Ctrl-C twice: exit {proc.returncode}, expected death by SIGINT\n{out[-2000:]}")

    # A storm of SIGUSR1 during gpt-small's half-second steps, with oneDNN held to its AVX2
    # kernels (DNNL_MAX_CPU_ISA caps it; a processor without AVX2 runs what it has). Those JIT
    # kernels keep live data below the stack pointer, where the kernel writes a signal frame:
    # while a handler ran on the computing thread, about a hundred signals corrupted the heap
    # (glibc: "corrupted size vs. prev_size") within 20 ms, and one SIGUSR1 per rank did so in
    # about one 3-rank run in 30. The signals now wait for a thread of their own.
    d = os.path.join(tmp, "storm")
    env = dict(os.environ, DNNL_MAX_CPU_ISA="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    proc = start([mt], d, ["--set", "model.preset=gpt-small", "--set", "train.seq_len=128", "--set",
                           "train.batch_size=2"], env)
    while proc.poll() is None and steps_logged(d) < 2:
        time.sleep(0.01)
    sent = 0
    until = time.time() + BOUND_S
    while proc.poll() is None and time.time() < until:
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            break
        sent += 1
        time.sleep(0.0001)
    out, _ = proc.communicate(timeout=BOUND_S)
    stopped = [r for r in records(d) if "stopped" in r]
    if proc.returncode != 75 or len(stopped) != 1 or stopped[0]["checkpoint"] is None:
        fail(f"a storm of {sent} SIGUSR1: exit {proc.returncode}, {stopped}\n{why(out)}")
    print(f"ok: a storm of {sent} SIGUSR1 (oneDNN on AVX2 kernels): stopped after step "
          f"{stopped[0]['step']}, saved, exit 75")

    # checkpoint.on_signal: never (with checkpoint.every set) and always (without).
    for mode, every, want_ckpt in (("never", 500, False), ("always", 0, True), ("auto", 0, False)):
        d = os.path.join(tmp, f"on-signal-{mode}-{every}")
        proc = subprocess.Popen([mt, "train", "--quiet", *CFG, "--set", f"checkpoint.every={every}",
                                 "--set", f"checkpoint.on_signal={mode}", "--set", f"run.dir={d}"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None and steps_logged(d) < 5:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=BOUND_S)
        stopped = [r for r in records(d) if "stopped" in r]
        if proc.returncode != 75 or len(stopped) != 1 or (stopped[0]["checkpoint"] is not None) != want_ckpt:
            fail(f"checkpoint.on_signal={mode}, every={every}: exit {proc.returncode}, {stopped}\n{out[-2000:]}")
        if os.path.isdir(os.path.join(d, "checkpoints")) != want_ckpt:
            fail(f"checkpoint.on_signal={mode}, every={every}: checkpoints {os.listdir(d)}")
    print("ok: Ctrl-C twice stops at once; checkpoint.on_signal never/always/auto")


def under_mpirun(mt, mpiexec, n, tmp):
    base = mpiexec.split()
    plain = base + [str(n), mt]
    ref = os.path.join(tmp, f"ref{n}")
    run(plain + ["train", "--quiet", *CFG, "--set", f"run.dir={ref}"])
    mtrun = [MTRUN, "-n", str(n), "--oversubscribe", "--run-dir", os.path.join(tmp, "mtrun-job"), mt]
    # Open MPI 4.1's mpirun, on SIGTERM, sends the ranks SIGCONT, SIGTERM odls_base_sigkill_timeout
    # seconds later, then SIGKILL, and exits 1 whatever the ranks' status: the ranks save, but
    # the job's status is mpirun's. Through mtrun (which passes SIGUSR1 to mpirun) it is 75.
    # The run under a SIGTERM to mpirun is long (the ranks see the signal seconds later) and not
    # compared; the others are resumed and compared with the reference.
    cases = [
        ("SIGTERM to mpirun", base[:1] + SIGKILL_TIMEOUT + base[1:] + [str(n), mt], 1,
         lambda p: p.send_signal(signal.SIGTERM)),
        ("SIGUSR1 to mpirun", plain, 75, lambda p: p.send_signal(signal.SIGUSR1)),
        (f"SIGTERM to rank {n - 1} only", plain, 75, lambda p: os.kill(p.victim, signal.SIGTERM)),
        ("SIGTERM to mtrun", mtrun, 75, lambda p: p.send_signal(signal.SIGTERM)),
    ]
    for what, cmd, status, send in cases:
        d = os.path.join(tmp, "".join(c if c.isalnum() else "-" for c in what))
        long_run = status != 75
        extra = ["--set", "train.steps=1000000"] if long_run else []
        step, took = stop_and_check(start(cmd, d, extra), d, what, send, n, status,
                                    1000000 if long_run else STEPS)
        if long_run:
            print(f"ok: {what} ({n} ranks): every rank stopped after step {step}, checkpoint written, "
                  f"mpirun's status {status} in {took:.2f} s")
            continue
        resume_matches(plain, d, ref, f"{what}, then --resume auto")
        print(f"ok: {what} ({n} ranks): every rank stopped after step {step}, checkpoint written, "
              f"exit 75 in {took:.2f} s; resumed bit-exactly")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--mpiexec", default="")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.ranks == 1:
            single_process(a.meshtrain, tmp)
        else:
            under_mpirun(a.meshtrain, a.mpiexec, a.ranks, tmp)


if __name__ == "__main__":
    main()
