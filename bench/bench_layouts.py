#!/usr/bin/env python3
"""PP = 2 vs DP = 2 vs TP = 2 on the same model and the same global batch: step time on shared memory
(two ranks on this machine) and step time and bytes on the wire between two emulated nodes (network
namespaces joined by 10 Gbit/s tbf links, MPI over TCP: tests/netns/netns.sh), with one rank as the
baseline.

The work is the same in every layout: gpt-small (6 x 384, byte vocabulary), bf16, sequences of 128,
8 sequences per optimizer step:
    np1  one rank, batch 8
    dp2  two ranks, batch 4 each (the gradients allreduced once per step, overlapped with backward)
    tp2  two ranks sharing batch 8 (activations allreduced inside every layer)
    pp2  two stages of 3 layers, 4 micro-batches of 2 (1F1B; activations and their gradients sent
         between the stages, the tied embedding's gradient summed over the embedding group)

Bytes on the wire are node 1's link counters (tx + rx, /sys/class/net/eth0/statistics, which count
Ethernet frames: payload plus TCP/IP headers), read before and after each run. Start-up (MPI wire-up,
the ranks' agreement, the final weights gathered for model.safetensors) moves bytes too, so each
layout runs twice, with STEPS_A and STEPS_B steps, and the bytes per step are the difference over
STEPS_B - STEPS_A steps. Step time is the median of the per-step times from metrics.jsonl after two
warm-up steps, median over ROUNDS interleaved rounds.

    bench/bench_layouts.py --meshtrain build/cpu/launch/meshtrain [--rounds 3] [--steps 6 14]
                           [--parts shm net]

The network part needs root (namespaces). Prints markdown tables with the machine's load average."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
NETNS = os.path.join(HERE, "..", "tests", "netns", "netns.sh")

LAYOUTS = {
    "np1": (1, ["--set", "train.batch_size=8"]),
    "dp2": (2, ["--set", "train.batch_size=4"]),
    "tp2": (2, ["--set", "train.batch_size=8", "--tp", "2"]),
    "pp2": (2, ["--set", "train.batch_size=2", "--set", "train.grad_accum=4", "--pp", "2"]),
}


def load():
    return float(open("/proc/loadavg").read().split()[0])


def common(steps, run_dir):
    return ["train", "--quiet", "--set", "model.preset=gpt-small", "--set", "train.seq_len=128",
            "--set", f"train.steps={steps}", "--set", "train.threads=1", "--set", "sample.tokens=0",
            "--set", "eval.every=0", "--set", "data.val_fraction=0", "--set", f"run.dir={run_dir}"]


def run(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        sys.exit(f"bench_layouts: {' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                 f"{r.stderr[-2000:]}")


def step_ms(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    return statistics.median([x["ms"] for x in rows if "ms" in x][2:])


def link_bytes(env):
    out = subprocess.run([NETNS, "stats", "1"], capture_output=True, text=True, check=True, env=env)
    tx, rx = (int(v) for v in out.stdout.split())
    return tx + rx


def shm(a, tmp):
    res = {n: [] for n in LAYOUTS}
    loads = []
    for r in range(a.rounds):
        for name, (ranks, flags) in LAYOUTS.items():
            d = os.path.join(tmp, f"shm_{name}_{r}")
            loads.append(load())
            launch = [a.meshtrain] if ranks == 1 else a.mpiexec.split() + [str(ranks), a.meshtrain]
            run(launch + common(a.steps[1], d) + flags)
            res[name].append(step_ms(d))
    print(f"## Shared memory: two ranks on this machine ({os.cpu_count()} cores), "
          f"{a.steps[1]} steps x {a.rounds} rounds, load {min(loads):.1f}-{max(loads):.1f}\n")
    print("| layout | ms/step (median of rounds) | per round | vs np1 |")
    print("| --- | --- | --- | --- |")
    base = statistics.median(res["np1"])
    for name, v in res.items():
        m = statistics.median(v)
        print(f"| {name} | {m:.0f} | {', '.join(f'{x:.0f}' for x in v)} | {base / m:.2f}x |")
    print()


def net(a, tmp):
    if os.getuid() != 0:
        print("## Network namespaces: skipped (needs root)\n")
        return
    env = dict(os.environ, MT_NETNS_PREFIX="mtblay", MT_NETNS_SUBNET="10.215.0",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    subprocess.run([NETNS, "up", "2"], check=True, env=env, stdout=subprocess.DEVNULL)
    try:
        for node in ("1", "2"):
            subprocess.run([NETNS, "shape", node, "rate", "10gbit"], check=True, env=env)
        hosts = os.path.join(tmp, "hosts")
        with open(hosts, "w") as f:
            f.write(subprocess.run([NETNS, "hostfile", "1"], capture_output=True, text=True,
                                   check=True, env=env).stdout)
        res = {n: {"ms": [], "bytes": []} for n in LAYOUTS if n != "np1"}
        loads = []
        for r in range(a.rounds):
            for name in res:
                ranks, flags = LAYOUTS[name]
                got = []
                for steps in a.steps:
                    d = os.path.join(tmp, f"net_{name}_{steps}_{r}")
                    loads.append(load())
                    before = link_bytes(env)
                    run([NETNS, "mpirun", "-np", str(ranks), "--hostfile", hosts,
                         "-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
                         a.meshtrain] + common(steps, d) + flags, env=env)
                    got.append(link_bytes(env) - before)
                res[name]["bytes"].append((got[1] - got[0]) / (a.steps[1] - a.steps[0]))
                res[name]["ms"].append(step_ms(d))
        print(f"## Two nodes over 10 Gbit/s links (network namespaces, MPI over TCP), "
              f"{a.rounds} rounds, load {min(loads):.1f}-{max(loads):.1f}\n")
        print("| layout | ms/step (median of rounds) | per round | MB on the wire per step "
              "(node 1, tx + rx) | per round |")
        print("| --- | --- | --- | --- | --- |")
        for name, v in res.items():
            print(f"| {name} | {statistics.median(v['ms']):.0f} | "
                  f"{', '.join(f'{x:.0f}' for x in v['ms'])} | "
                  f"{statistics.median(v['bytes']) / 1e6:.2f} | "
                  f"{', '.join(f'{x / 1e6:.2f}' for x in v['bytes'])} |")
        print()
    finally:
        subprocess.run([NETNS, "down"], env=env, stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", default="mpirun --allow-run-as-root --oversubscribe -np")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, nargs=2, default=[6, 14], metavar=("STEPS_A", "STEPS_B"))
    ap.add_argument("--parts", nargs="+", default=["shm", "net"], choices=["shm", "net"])
    a = ap.parse_args()
    if a.steps[1] <= a.steps[0] or a.steps[0] < 3:
        ap.error("--steps A B: need 3 <= A < B (two warm-up steps are dropped)")
    a.meshtrain = os.path.abspath(a.meshtrain)
    print(f"bench_layouts: {platform.node()}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if "shm" in a.parts:
            shm(a, tmp)
        if "net" in a.parts:
            net(a, tmp)


if __name__ == "__main__":
    main()
