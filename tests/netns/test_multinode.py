"""The GPT job across three nodes (network namespaces of tests/netns/netns.sh, one rank each,
started by launch/mtrun from node 1 through the rsh agent), as a user on a cluster runs it:

  match   DP over TCP across the nodes gives the same losses, bit for bit, as the same 3 ranks in
          one namespace (shared memory), and the gradients really cross every node's link;
  shaped  with bandwidth limits (tbf) and latency (netem, or netns.sh's delay line on kernels
          without it) on the nodes' links the job completes with the same losses;
  cut     pulling node 3's cable mid-run makes every rank exit (and mpirun too) within
          MESHTRAIN_COMM_TIMEOUT + 10 s, with an error that says what happened;
  kill    killing node 2's processes mid-run does the same for the others.

Needs root (exit 77, skipped, otherwise); as root, a cluster that cannot be set up is a failure.
  /usr/bin/python3 tests/netns/test_multinode.py --meshtrain build/cpu/launch/meshtrain [CASE...]
"""
import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NETNS = os.path.join(HERE, "netns.sh")
MTRUN = os.path.join(ROOT, "launch", "mtrun")
PREFIX = "mtmn"
TIMEOUT = 10  # MESHTRAIN_COMM_TIMEOUT for the fault cases
ENV = dict(os.environ, MT_NETNS_PREFIX=PREFIX, OMPI_ALLOW_RUN_AS_ROOT="1",
           OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_mpi_yield_when_idle="1")


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def netns(*args, check=True):
    p = subprocess.run([NETNS, *args], env=ENV, capture_output=True, text=True, timeout=60)
    if check and p.returncode != 0:
        fail(f"netns.sh {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def link_bytes(node):
    tx, rx = netns("stats", str(node)).split()
    return int(tx) + int(rx)


def train_cmd(meshtrain, run_dir, hostfile, ranks, steps, extra_env=()):
    """mtrun inside node 1: the hostfile's nodes, or node 1 alone (hostfile None)."""
    cmd = [NETNS, "exec", "1", MTRUN, "--run-dir", run_dir, "--bind", "none", "--threads", "1",
           "--mca", "pml", "ob1", "--mca", "btl", "self,vader,tcp", "-x", "MESHTRAIN_THREADS=1"]
    if hostfile:
        cmd += ["--hostfile", hostfile, "--rsh", os.path.join(HERE, "rsh"), "--net", "eth0",
                "--mca", "plm_rsh_no_tree_spawn", "1"]
    else:
        cmd += ["-n", str(ranks), "--oversubscribe"]
    for e in extra_env:
        cmd += ["-x", e]
    cmd += [meshtrain, "train", "--quiet", "--set", "model.preset=gpt-tiny",
            "--set", f"train.steps={steps}", "--set", "train.batch_size=1",
            "--set", "train.seq_len=32", "--set", "train.precision=fp32",
            "--set", "sample.tokens=0", "--set", "eval.every=0", "--set", "dp.bucket_mb=0.05",
            "--set", "run.log_every=1"]
    return cmd


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))
            if '"loss"' in l and "step" in json.loads(l)]


def run_ok(cmd, what):
    t = time.time()
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        fail(f"{what}: exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return time.time() - t


def case_match(a, tmp, hosts):
    steps = 8
    run_ok(train_cmd(a.meshtrain, f"{tmp}/one_ns", None, 3, steps), "3 ranks in one namespace")
    before = [link_bytes(k) for k in (1, 2, 3)]
    secs = run_ok(train_cmd(a.meshtrain, f"{tmp}/three", hosts, 3, steps), "3 nodes")
    moved = [link_bytes(k) - b for k, b in zip((1, 2, 3), before)]
    one, three = losses(f"{tmp}/one_ns"), losses(f"{tmp}/three")
    if len(one) != steps or one != three:
        fail(f"losses differ: one namespace {one}, three nodes {three}")
    # A ring allreduce moves 2 (N-1)/N of the gradient through every rank's link each step (sent,
    # and as much received): fp32 gradients of the 0.12M-parameter model.
    params = 0
    with open(f"{tmp}/three/model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for k, v in header.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                params += n
    expect = steps * 2 * (2 / 3) * params * 4 * 2
    if min(moved) < 0.9 * expect:
        fail(f"bytes through the nodes' links {moved}, expected at least {0.9 * expect:.0f} each")
    print(f"ok match: 3 nodes = 1 namespace over {steps} steps (last loss {three[-1]:.6f}); "
          f"{secs:.1f} s; link bytes per node {moved} (ring estimate {expect:.0f})", flush=True)


def case_shaped(a, tmp, hosts):
    steps = 8
    ref = f"{tmp}/one_ns"
    if not os.path.exists(f"{ref}/metrics.jsonl"):
        run_ok(train_cmd(a.meshtrain, ref, None, 3, steps), "3 ranks in one namespace")
    netns("shape", "3", "rate", "20mbit")
    limits = "tbf 20mbit"
    netns("shape", "2", "rate", "50mbit", "delay", "20ms")
    # Without netem in the kernel, netns.sh carries the delay on a userspace delay line.
    how = "delay line" if os.path.exists(f"/run/mtnetns/{PREFIX}-n2.delayline.pid") else "netem"
    limits += f" on node 3; 20 ms each way ({how}) + tbf 50mbit on node 2"
    try:
        secs = run_ok(train_cmd(a.meshtrain, f"{tmp}/shaped", hosts, 3, steps), "shaped links")
    finally:
        netns("unshape", "2")
        netns("unshape", "3")
    if losses(f"{tmp}/shaped") != losses(ref):
        fail(f"losses differ with shaped links: {losses(f'{tmp}/shaped')} vs {losses(ref)}")
    # 20 Mbit/s is 2.5 MB/s: the ~10 MB node 3 moves take seconds, so the limit took effect.
    if secs < 1.5:
        fail(f"the shaped job took {secs:.2f} s: the 20mbit limit did not bite")
    print(f"ok shaped: {limits}: completed in {secs:.1f} s with the same losses", flush=True)


def ranks_alive(nodes):
    out = []
    for k in nodes:
        for pid in netns("pids", str(k), check=False).split():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm in ("meshtrain", "mpirun", "orted"):
                out.append(f"{comm}@n{k}")
    return out


def case_fault(a, tmp, hosts, kind):
    run_dir = f"{tmp}/{kind}"
    cmd = train_cmd(a.meshtrain, run_dir, hosts, 3, 100000, (f"MESHTRAIN_COMM_TIMEOUT={TIMEOUT}",))
    log = open(f"{tmp}/{kind}.log", "w+")
    # Output to a file, not a pipe: Open MPI's daemons inherit it, and a pipe they hold open
    # would block the reader after the job ended.
    p = subprocess.Popen(cmd, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)

    def output():
        log.flush()
        with open(log.name) as f:
            return f.read()[-4000:]

    metrics = f"{run_dir}/metrics.jsonl"
    t0 = time.time()
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        if p.poll() is not None or time.time() - t0 > 120:
            p.kill()
            fail(f"{kind}: the job did not start training in {time.time() - t0:.0f} s "
                 f"(processes: {ranks_alive((1, 2, 3))}):\n{output()}")
        time.sleep(0.1)
    if kind == "cut":
        netns("cut", "3")
        survivors = (1, 2, 3)  # node 3's rank lives on, cut off
    else:
        netns("kill", "2")
        survivors = (1, 3)
    t_fault = time.time()
    deadline = t_fault + TIMEOUT + 10
    while ranks_alive(survivors) and time.time() < deadline + 5:
        time.sleep(0.2)
    left = ranks_alive(survivors)
    t_end = time.time() - t_fault
    try:
        p.wait(timeout=max(1, deadline + 5 - time.time()))
    except subprocess.TimeoutExpired:
        p.kill()
        fail(f"{kind}: mtrun/mpirun still running {TIMEOUT + 15} s after the fault:\n{output()}")
    out = output()
    t_mpirun = time.time() - t_fault
    if kind == "cut":
        netns("heal", "3")
        # The next case needs node 3 back: wait until it answers again.
        for _ in range(50):
            if subprocess.run([NETNS, "exec", "3", "ping", "-c1", "-W1", "10.213.0.1"], env=ENV,
                              capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
    if left:
        fail(f"{kind}: still alive {t_end:.1f} s after the fault: {left}\n{out[-3000:]}")
    if t_end > TIMEOUT + 10 or t_mpirun > TIMEOUT + 10:
        fail(f"{kind}: ranks ended {t_end:.1f} s and mpirun {t_mpirun:.1f} s after the fault, "
             f"limit {TIMEOUT + 10} s\n{out[-3000:]}")
    if p.returncode == 0:
        fail(f"{kind}: the job exited 0 after the fault\n{out[-3000:]}")
    # Either a rank's collective timed out (naming the operation and the timeout), or mpirun lost
    # the node's daemon first (naming the node).
    lost = f"{PREFIX}-n3" if kind == "cut" else f"{PREFIX}-n2"
    said = [m for m in (f"did not complete within {TIMEOUT} s",
                        "lost communication with a remote daemon", lost) if m in out]
    if not (said and (said[0].startswith("did not") or len(said) == 2)):
        fail(f"{kind}: no clear error (a collective timeout, or the lost node {lost}):\n{out}")
    print(f"ok {kind}: every rank and mpirun ended {t_end:.1f} s / {t_mpirun:.1f} s after the fault "
          f"(limit {TIMEOUT + 10} s), exit {p.returncode}, said: {said}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("cases", nargs="*", default=["match", "shaped", "cut", "kill"])
    a = ap.parse_args()
    a.meshtrain = os.path.abspath(a.meshtrain)
    if os.geteuid() != 0:
        print("SKIP: network namespaces need root (CI runs this as root)")
        sys.exit(77)
    for c in a.cases:
        if c not in ("match", "shaped", "cut", "kill"):
            fail(f"unknown case '{c}': expected match, shaped, cut, kill")
    # Namespace names are global to the machine: another run of this test at once (another
    # build tree's ctest) would tear down this cluster. One run at a time, machine-wide.
    lock = open(f"/run/lock/meshtrain-netns-{PREFIX}.lock", "w")
    until = time.time() + 240
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() > until:
                fail(f"another run of this test held /run/lock/meshtrain-netns-{PREFIX}.lock for 240 s")
            time.sleep(0.5)
    try:
        netns("up", "3")
        with tempfile.TemporaryDirectory() as tmp:
            hosts = f"{tmp}/hosts"
            with open(hosts, "w") as f:
                f.write(netns("hostfile", "1"))
            for c in a.cases:
                if c in ("cut", "kill"):
                    case_fault(a, tmp, hosts, c)
                else:
                    globals()[f"case_{c}"](a, tmp, hosts)
    finally:
        netns("down", check=False)  # kills whatever still runs in the nodes


if __name__ == "__main__":
    main()
