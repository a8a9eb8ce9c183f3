"""launch/meshtrain-supervise as a user runs it:
- a job SIGKILLed after its first checkpoint is relaunched with --resume auto, the restart and
  its cause (the signal) are logged, and the job ends with the losses and weights of a run that
  never failed;
- a job that keeps failing is relaunched --max-restarts times, each cause logged (meshtrain's
  error line), and the supervisor exits with the job's status;
- a preempted job (exit status 75 after a SIGUSR1) is relaunched without counting as a failure
  and ends as the uninterrupted run; a SIGTERM to the supervisor reaches the job, which saves and
  exits 75, and the supervisor exits 75 without relaunching it."""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from ckpt_util import TINY, compare_losses, fail, losses, run, same_weights

# Runs the training in the background; on the first attempt (no flag file yet) SIGKILLs it as
# soon as it sees a complete checkpoint, so that the supervisor sees a job killed mid-run, and
# writes the checkpoints that existed once the job was dead into the flag file: under load the
# job may complete another one before the 10 ms poll sees the first.
KILLER = r'''
set -u
"$@" &
pid=$!
if [ ! -e "$FLAG" ]; then
  touch "$FLAG"
  for i in $(seq 1 3000); do
    if ls -d "$CKPTS"/step_* >/dev/null 2>&1; then
      kill -KILL $pid; wait $pid; (cd "$CKPTS" && ls -d step_*) > "$FLAG"; exit 137
    fi
    sleep 0.01
  done
fi
wait $pid
'''


# On the first attempt, SIGUSR1 to the job once it has a checkpoint (a preemption: it saves and
# exits 75); later attempts run undisturbed.
PREEMPTER = r'''
set -u
"$@" &
pid=$!
if [ ! -e "$FLAG" ]; then
  touch "$FLAG"
  for i in $(seq 1 3000); do
    if ls -d "$CKPTS"/step_* >/dev/null 2>&1; then kill -USR1 $pid; break; fi
    sleep 0.01
  done
fi
wait $pid
'''


def preemption(a, tmp, cfg, ref):
    """Status 75 is relaunched without counting as a failure (--max-restarts 0), and the job ends
    as the uninterrupted one; a SIGTERM to the supervisor reaches the job, which saves and exits
    75, and is not relaunched."""
    d = os.path.join(tmp, "preempted")
    log = os.path.join(tmp, "preempt.log")
    env = dict(os.environ, FLAG=os.path.join(tmp, "preempted-once"), CKPTS=os.path.join(d, "checkpoints"))
    p = subprocess.run([a.supervise, "--max-restarts", "0", "--delay", "0", "--log", log, "--",
                        "bash", "-c", PREEMPTER, "preempter", a.meshtrain, "train", "--quiet", *cfg,
                        "--set", f"run.dir={d}", "--resume", "auto"],
                       capture_output=True, text=True, timeout=240, env=env)
    text = open(log).read()
    if p.returncode != 0 or "attempt 1 was preempted: exit status 75" not in text \
            or "relaunch after preemption 1 of at most 100" not in text or "attempt 2 succeeded" not in text:
        fail(f"a preempted job: supervisor exited {p.returncode}, log:\n{text}\n{p.stderr[-3000:]}")
    compare_losses(losses(ref), losses(d), range(1, 61), what="preempted job")
    if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
        fail("preempted job: final weights differ from the uninterrupted run's")

    d = os.path.join(tmp, "stopped")
    log = os.path.join(tmp, "stopped.log")
    long_cfg = [*cfg, "--set", "train.steps=100000"]
    proc = subprocess.Popen([a.supervise, "--log", log, "--", a.meshtrain, "train", "--quiet", *long_cfg,
                             "--set", f"run.dir={d}", "--resume", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(d, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and \
            (not os.path.exists(metrics) or '"checkpoint"' not in open(metrics).read()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    text = open(log).read()
    if proc.returncode != 75 or "received SIGTERM: passing it to the command" not in text \
            or "attempt 1 ended after SIGTERM: exit status 75; not relaunching" not in text:
        fail(f"SIGTERM to the supervisor: exit {proc.returncode}, log:\n{text}\n{out[-3000:]}")
    stopped = [json.loads(l) for l in open(metrics) if '"stopped"' in l]
    if len(stopped) != 1 or stopped[0]["stopped"] != "SIGTERM" or not stopped[0]["checkpoint"]:
        fail(f"SIGTERM to the supervisor: the job did not stop with a checkpoint: {stopped}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--supervise", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = [*TINY, "--set", "train.batch_size=2", "--set", "train.steps=60", "--set", "checkpoint.every=10",
               "--set", "train.precision=fp32"]
        ref = os.path.join(tmp, "ref")
        run([a.meshtrain, "train", "--quiet", *cfg, "--set", f"run.dir={ref}"])
        d = os.path.join(tmp, "job")
        log = os.path.join(tmp, "supervise.log")
        env = dict(os.environ, FLAG=os.path.join(tmp, "killed-once"), CKPTS=os.path.join(d, "checkpoints"))
        p = subprocess.run([a.supervise, "--max-restarts", "2", "--delay", "0", "--log", log, "--",
                            "bash", "-c", KILLER, "killer", a.meshtrain, "train", "--quiet", *cfg,
                            "--set", f"run.dir={d}", "--resume", "auto"],
                           capture_output=True, text=True, timeout=240, env=env)
        text = open(log).read()
        if p.returncode != 0:
            fail(f"supervised job exited {p.returncode}\n{text}\n{p.stderr[-3000:]}")
        if "attempt 1 failed: exit status 137 (signal 9, SIGKILL)" not in text or "restart 1 of 2" not in text \
                or "attempt 2 succeeded" not in text:
            fail(f"the log does not show one SIGKILL, one restart and a success:\n{text}")
        at_kill = sorted(open(env["FLAG"]).read().split())
        if not at_kill or at_kill[-1] == "step_00000060":
            fail(f"the job was not killed mid-run (checkpoints when killed: {at_kill})")
        resumed = [l for l in open(os.path.join(d, "metrics.jsonl")) if "resumed_from" in l]
        if len(resumed) != 1 or at_kill[-1] not in resumed[0]:
            fail(f"the relaunch did not resume from the latest checkpoint at the kill, {at_kill[-1]}: "
                 f"{resumed}")
        compare_losses(losses(ref), losses(d), range(1, 61), what="supervised job")
        if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
            fail("supervised job: final weights differ from the uninterrupted run's")

        preemption(a, tmp, cfg, ref)

        # A job that cannot succeed: 1 attempt + 2 restarts, then the job's status.
        log2 = os.path.join(tmp, "fail.log")
        p = subprocess.run([a.supervise, "--max-restarts", "2", "--delay", "0", "--log", log2, "--",
                            a.meshtrain, "train", "--set", "model.preset=gpt-nope", "--resume", "auto"],
                           capture_output=True, text=True, timeout=120)
        text = open(log2).read()
        if p.returncode != 1:
            fail(f"a failing job: supervisor exited {p.returncode}, expected the job's 1\n{text}")
        if text.count("failed: exit status 1; cause: meshtrain: error:") != 3 or "gpt-nope" not in text \
                or "giving up after 2 restart(s)" not in text:
            fail(f"a failing job: expected 3 failures with meshtrain's error as the cause:\n{text}")
        p = subprocess.run([a.supervise, "--max-restarts", "x", "--", "true"], capture_output=True, text=True)
        if p.returncode != 2 or "not a non-negative integer" not in p.stderr:
            fail(f"bad --max-restarts: {p.returncode} {p.stderr}")
    print("ok: a killed job restarts from its checkpoint to the uninterrupted result; restarts are capped and "
          "logged; a preempted job (75) is relaunched outside the cap; SIGTERM to the supervisor stops the job")


if __name__ == "__main__":
    main()
