#!/usr/bin/python3
"""Issue 16 under mpirun -np N, as a user runs it:

  - the automatic CPU thread count divides the cores among the node's ranks: every rank reports
    the count it chose (metrics.jsonl's threads_by_rank) and ranks x threads must not exceed the
    cores (before, each of 4 ranks on 2 cores took both: 536 ms/step against 8.6);
    MESHTRAIN_THREADS and train.threads override it;
  - a refusal (a missing model.init, another model's checkpoint, a model too large for memory)
    ends the job non-zero, within a bounded time, and no rank creates the run directory;
  - a resumed job peaks no higher in memory than a fresh one (largest rank, margin 5% + 16 MiB).

    test_robustness_mpi.py --meshtrain PATH --ranks N --mpiexec "mpiexec FLAGS -n"
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

TINY = ["--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32", "--set",
        "train.batch_size=1", "--set", "sample.tokens=0", "--set", "eval.every=0"]


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def run(cmd, env=None, timeout=300):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return p


def memory_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if "peak_rss_mib" in l]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", required=True)
    ap.add_argument("--ranks", type=int, required=True)
    a = ap.parse_args()
    n = a.ranks
    mpi = a.mpiexec.split() + [str(n), a.meshtrain]
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        # ---- threads ----
        for label, extra, env, want in (
                ("automatic", [], {}, None),
                ("MESHTRAIN_THREADS=2", [], {"MESHTRAIN_THREADS": "2"}, 2),
                ("train.threads=3", ["--set", "train.threads=3"], {}, 3)):
            run_dir = os.path.join(tmp, f"threads_{len(extra)}_{len(env)}")
            e = dict(os.environ)
            e.pop("MESHTRAIN_THREADS", None)
            e.update(env)
            p = run(mpi + ["train", "--quiet", *TINY, "--set", "train.steps=2",
                           "--set", f"run.dir={run_dir}", *extra], env=e)
            if p.returncode != 0:
                fail(f"{label}: exited {p.returncode}\n{p.stdout}\n{p.stderr}")
            threads = memory_records(run_dir)[-1]["threads_by_rank"]
            if len(threads) != n:
                fail(f"{label}: threads_by_rank {threads} has not {n} entries")
            if want is None:
                if sum(threads) > max(cores, n):
                    fail(f"{label}: {n} ranks chose {threads} threads on {cores} cores: the ranks "
                         "oversubscribe the cores")
                if min(threads) < 1:
                    fail(f"{label}: a rank chose {threads}")
            elif threads != [want] * n:
                fail(f"{label}: expected {want} threads on every rank, got {threads}")
            print(f"{label}: threads by rank {threads} on {cores} cores")

        # ---- refusals write nothing ----
        def refused(label, args, *fragments, timeout=180):
            run_dir = os.path.join(tmp, "refused")
            p = run(mpi + ["train", "--quiet", *args, "--set", f"run.dir={run_dir}"],
                    timeout=timeout)
            if p.returncode == 0:
                fail(f"{label}: succeeded\n{p.stdout}")
            for f in fragments:
                if f not in p.stderr:
                    fail(f"{label}: stderr lacks {f!r}:\n{p.stderr}")
            if os.path.exists(run_dir):
                fail(f"{label}: left {run_dir} behind: {os.listdir(run_dir)}")
            print(f"{label}: refused, nothing written")

        refused("missing model.init", [*TINY, "--set",
                                       f"model.init={os.path.join(tmp, 'missing.safetensors')}"],
                "missing.safetensors")
        refused("model too large", ["--set", "model.preset=gpt2-xl", "--set", "model.n_layer=480"],
                "not enough memory", "Nothing was allocated or written")
        src = os.path.join(tmp, "src")
        p = run(mpi + ["train", "--quiet", *TINY, "--set", "train.steps=2", "--set",
                       "checkpoint.every=2", "--set", f"run.dir={src}"])
        if p.returncode != 0:
            fail(f"source run: {p.stderr}")
        ck = os.path.join(src, "checkpoints", "step_00000002")
        refused("another model's checkpoint",
                ["--config", os.path.join(ck, "config.toml"), "--set", "model.n_layer=7",
                 "--resume", ck], "holds another model")

        # ---- resume memory ----
        small = ["--set", "model.preset=gpt-small", "--set", "train.seq_len=64", "--set",
                 "train.batch_size=1", "--set", "train.threads=1", "--set", "sample.tokens=0",
                 "--set", "eval.every=0", "--set", "checkpoint.every=1"]
        for zero in (0, 1):
            run_dir = os.path.join(tmp, f"rss_zero{zero}")
            z = ["--set", f"train.zero={zero}"]
            p = run(mpi + ["train", "--quiet", *small, *z, "--set", "train.steps=1", "--set",
                           f"run.dir={run_dir}"], timeout=600)
            if p.returncode != 0:
                fail(f"fresh zero={zero}: {p.stderr}")
            p = run(mpi + ["train", "--quiet", *small, *z, "--set", "train.steps=2", "--set",
                           f"run.dir={run_dir}", "--resume", "latest"], timeout=600)
            if p.returncode != 0:
                fail(f"resumed zero={zero}: {p.stderr}")
            recs = memory_records(run_dir)
            if len(recs) != 2:
                fail(f"zero={zero}: expected two memory records, got {recs}")
            fresh, resumed = max(recs[0]["peak_rss_mib"]), max(recs[1]["peak_rss_mib"])
            print(f"zero={zero}: peak RSS (largest of {n} ranks) fresh {fresh:.0f} MiB, "
                  f"resumed {resumed:.0f} MiB")
            if resumed > fresh * 1.05 + 16:
                fail(f"zero={zero}: the resumed job peaked at {resumed:.0f} MiB, the fresh one at "
                     f"{fresh:.0f}")
    print("PASS")


if __name__ == "__main__":
    main()
