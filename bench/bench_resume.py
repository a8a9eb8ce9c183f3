#!/usr/bin/env python3
"""Resume cost per rank: bytes each rank reads from a checkpoint and the time its load takes.

For each layout (DP 2 with ZeRO-1, TP 2; two ranks under mpirun), a model of --layers x --width
(default 12 x 768, byte vocabulary) trains one step and checkpoints it; then the job resumes from
that checkpoint (no further step). With --ref (a meshtrain built before format version 2) the
checkpoint is also written in version 1, and both are resumed by the new binary: version 1 files
are read whole (what every resume did before), version 2 files only in the blocks a rank needs.
Each rank logs "read X MiB of N shard file(s) of Y MiB in T ms" for its load. The checkpoint's
files are evicted from the page cache before every resume (posix_fadvise DONTNEED on those
files only), so reads come from the disk. Rounds are interleaved; the load average is recorded
with every run. The old binary's whole resume wall time is given beside the new one's too.

  bench/bench_resume.py --meshtrain build/cpu/launch/meshtrain [--ref OLD/meshtrain] [--rounds 3]
Prints a markdown table.
"""
import argparse
import glob
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_mpi_yield_when_idle="1")
LINE = re.compile(r"\[rank (\d+)/\d+\] \[info\] checkpoint '[^']*': read ([0-9.]+) MiB of (\d+) "
                  r"shard file\(s\) of ([0-9.]+) MiB in (\d+) ms")


def load():
    return open("/proc/loadavg").read().split()[0]


def base(a, run_dir):
    return ["--set", "model.preset=gpt-small", "--set", f"model.n_layer={a.layers}",
            "--set", f"model.n_embd={a.width}", "--set", f"model.n_head={a.width // 64}",
            "--set", "train.seq_len=64", "--set", "train.batch_size=1", "--set", "train.threads=1",
            "--set", "sample.tokens=0", "--set", "eval.every=0", "--set", "data.val_fraction=0.001",
            "--set", f"run.dir={run_dir}"]


def run(cmd):
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1200)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p, time.time() - t


def evict(ckpt):
    for f in glob.glob(os.path.join(ckpt, "*")):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--ref", help="a meshtrain that writes format version 1")
    ap.add_argument("--mpiexec", default="mpiexec --oversubscribe -n 2")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    mpi = a.mpiexec.split()
    layouts = {"DP 2, ZeRO-1": ["--set", "train.zero=1"], "TP 2": ["--set", "train.tp=2"]}
    writers = {"v2": a.meshtrain}
    if a.ref:
        writers["v1"] = a.ref
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_RESUME_DIR", "/var/tmp")) as tmp:
        for name, extra in layouts.items():
            ckpts = {}
            for fmt, binary in writers.items():
                d = os.path.join(tmp, f"{name[:4].strip()}-{fmt}".replace(" ", ""))
                run(mpi + [binary, "train", "--quiet", *base(a, d), *extra, "--set", "train.steps=1",
                           "--set", "checkpoint.every=1"])
                ckpts[fmt] = sorted(glob.glob(os.path.join(d, "checkpoints", "step_*")))[-1]
            results = {}
            for _ in range(a.rounds):
                for fmt, ck in ckpts.items():
                    for binary, who in [(a.meshtrain, "new")] + ([(a.ref, "old")] if a.ref and fmt == "v1" else []):
                        d = os.path.join(tmp, "resume")
                        shutil.rmtree(d, ignore_errors=True)
                        evict(ck)
                        l0 = load()
                        p, wall = run(mpi + [binary, "train", "--quiet", *base(a, d), *extra,
                                             "--set", "train.steps=1", "--resume", ck])
                        per_rank = {int(m[1]): (float(m[2]), int(m[3]), float(m[4]), int(m[5]))
                                    for m in LINE.finditer(p.stderr)}
                        results.setdefault((fmt, who), []).append((per_rank, wall, l0))
            for (fmt, who), runs in results.items():
                walls = [w for _, w, _ in runs]
                loads = "/".join(l for _, _, l in runs)
                if who == "old":
                    rows.append(f"| {name} | {fmt} | old binary | - | - | {statistics.median(walls):.1f} | {loads} |")
                    continue
                for r in sorted(runs[0][0]):
                    mib = runs[0][0][r][0]
                    files = f"{runs[0][0][r][1]} files, {runs[0][0][r][2]:.0f} MiB"
                    ms = statistics.median(x[0][r][3] for x in runs)
                    rows.append(f"| {name} | {fmt} | rank {r} | {mib:.1f} of {files} | {ms:.0f} | "
                                f"{statistics.median(walls):.1f} | {loads} |")
    print(f"model {a.layers} x {a.width}, byte vocabulary; median of {a.rounds} rounds\n")
    print("| layout | format | reader | MiB read (of the files opened) | load ms | resume wall s | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
