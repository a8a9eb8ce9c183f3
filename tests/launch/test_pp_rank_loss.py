"""A rank killed mid-pipeline (Open MPI, with mpirun told to leave the job to the ranks, as under
Slurm without --kill-on-bad-exit or Kubernetes): PP = N, the last stage SIGKILLed while the
pipeline runs; every process of the job must be gone within MESHTRAIN_COMM_TIMEOUT + 10 s, the
job exits non-zero, and a surviving rank names the lost peer by rank and pipeline stage."""
import argparse
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ckpt_util import TINY, fail  # noqa: E402
from test_checkpoint_mpi import alive, rank_pid  # noqa: E402

TIMEOUT_S = 10


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    a = ap.parse_args()
    n = a.ranks
    victim_rank = n - 1  # the last stage (DP 1, TP 1: world rank = stage)
    mpi = a.mpiexec.split()
    cmd = mpi[:1] + ["--mca", "orte_abort_on_non_zero_status", "0"] + mpi[1:] + [str(n), a.meshtrain]
    run_dir = f"/tmp/meshtrain-pp-loss-{os.getpid()}"
    args = cmd + ["train", "--quiet", *TINY, "--set", "model.n_layer=4", "--set", "train.batch_size=1",
                  "--set", "train.grad_accum=4", "--set", "train.steps=100000", "--pp", str(n),
                  "--set", f"run.dir={run_dir}"]
    env = dict(os.environ, MESHTRAIN_COMM_TIMEOUT=str(TIMEOUT_S))
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    victim = None

    def fail_job(msg):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        if victim is not None and alive(victim):
            os.kill(victim, signal.SIGKILL)
        fail(msg)

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and victim is None:
        victim = rank_pid(proc.pid, victim_rank)
        time.sleep(0.01)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    # Kill once steps are running: mid-pipeline, as a step takes a few milliseconds.
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and open(metrics).read().count('"loss"') >= 5:
            break
        time.sleep(0.01)
    if victim is None or proc.poll() is not None:
        fail_job(f"could not find rank {victim_rank} of a running job (exit {proc.poll()})")
    os.kill(victim, signal.SIGKILL)
    t_kill = time.time()
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S + 10)
    except subprocess.TimeoutExpired:
        fail_job(f"the job was still running {TIMEOUT_S + 10} s after rank {victim_rank} was killed")
    took = time.time() - t_kill
    if proc.returncode == 0:
        fail_job(f"the job exited 0 after rank {victim_rank} was lost:\n{out[-3000:]}")
    stage = f"pipeline stage {victim_rank}"
    if not any(f"rank {victim_rank}" in line and (stage in line or "lost" in line) for line in out.splitlines()):
        fail(f"no rank named the lost rank {victim_rank} ({stage}):\n" + "\n".join(l for l in out.splitlines() if "error" in l or "rank" in l)[-3000:])
    subprocess.run(["rm", "-rf", run_dir])
    print(f"ok: PP = {n}, rank {victim_rank} ({stage}) killed mid-pipeline; the job ended in {took:.1f} s "
          f"(limit {TIMEOUT_S + 10} s), naming it")


if __name__ == "__main__":
    main()
