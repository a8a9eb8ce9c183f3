"""launch/mtrun as a user runs it: the mpirun command it prints for one node and for many (host
list, hostfile), GPUs, threads and binding, settings passed with -x, a real 2-rank job with its
run directory, and a clear error (exit 2, nothing created) for every kind of bad argument.
  python3 tests/launch/test_mtrun.py --meshtrain build/cpu/launch/meshtrain
"""
import argparse
import os
import shlex
import stat
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MTRUN = os.path.join(ROOT, "launch", "mtrun")


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def mtrun(args, env=None, cwd=None, timeout=120):
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("MESHTRAIN_", "NCCL_", "UCX_", "OMP_", "CUDA_"))}
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    e.update(env or {})
    return subprocess.run([MTRUN, *args], env=e, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def command_of(p):
    """The mpirun command mtrun printed, as a list of words."""
    lines = [l for l in p.stderr.splitlines() if l.startswith("mtrun: mpirun ") or
             l.startswith("mtrun: /")]
    if len(lines) != 1:
        fail(f"expected one printed command, got:\n{p.stderr}")
    return shlex.split(lines[0][len("mtrun: "):])


def expect_cmd(args, want, env=None, cwd=None):
    p = mtrun(["--dry-run", *args], env, cwd)
    if p.returncode != 0:
        fail(f"mtrun {' '.join(args)} exited {p.returncode}: {p.stderr}")
    got = command_of(p)
    for w in want:
        # Each wanted fragment appears as consecutive words of the command.
        ws = w.split()
        if not any(got[i:i + len(ws)] == ws for i in range(len(got))):
            fail(f"mtrun {' '.join(args)}: '{w}' missing from\n{' '.join(got)}")
    return got


def expect_error(args, words, env=None, cwd=None):
    p = mtrun(args, env, cwd)
    if p.returncode != 2 or not all(w in p.stderr for w in words):
        fail(f"mtrun {' '.join(args)}: expected exit 2 naming {words}, got {p.returncode}:\n"
             f"{p.stdout}{p.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    a = ap.parse_args()
    mt = os.path.abspath(a.meshtrain)
    with tempfile.TemporaryDirectory() as tmp:
        # One node: N ranks, threads with core binding (T cores per rank), a run directory.
        got = expect_cmd(["-n", "2", "--threads", "1", "--run-dir", f"{tmp}/r", mt, "train"],
                         ["-np 2", "--map-by ppr:2:node:PE=1 --bind-to core",
                          "-x MESHTRAIN_THREADS=1", f"{mt} train --set run.dir={tmp}/r"])
        if "--hostfile" in got:
            fail("one node needs no hostfile")
        if os.path.exists(f"{tmp}/r"):
            fail("--dry-run created the run directory")
        # Without --threads no binding (a multi-threaded rank must not be pinned to one core).
        expect_cmd(["-n", "4", mt, "train"], ["--map-by ppr:4:node --bind-to none"])
        # Many nodes from a host list: ranks per node from --gpus, the network for MPI and NCCL,
        # NCCL settings of this shell passed by name, an explicit -x.
        got = expect_cmd(["--hosts", "node1,node2", "--gpus", "8", "--net", "ib0",
                          "-x", "NCCL_IB_HCA=mlx5", "--run-dir", f"{tmp}/r", mt, "train"],
                         ["-np 16", f"--hostfile {tmp}/r/hostfile", "--map-by ppr:8:node",
                          "--mca btl_tcp_if_include ib0", "--mca oob_tcp_if_include ib0",
                          "-x NCCL_IB_HCA=mlx5", "-x NCCL_SOCKET_IFNAME=ib0", "-x NCCL_DEBUG"],
                         env={"NCCL_DEBUG": "INFO"})
        # A hostfile with slots, comments and blank lines; -n fewer than the capacity.
        with open(f"{tmp}/hosts", "w") as f:
            f.write("# the cluster\nnodeA slots=4\n\nnodeB slots=4  # second\n")
        expect_cmd(["--hostfile", f"{tmp}/hosts", "--per-node", "4", "-n", "6",
                    "--threads", "8", "--bind", "numa", mt, "train"],
                   ["-np 6", "--map-by ppr:4:node --bind-to numa", "-x MESHTRAIN_THREADS=8"])
        # Node loss: keepalives end mpirun within the node timeout, half the comm timeout when
        # that is shorter; 0 turns them off.
        expect_cmd(["-n", "2", mt], ["--mca oob_tcp_keepalive_probes 9"])
        expect_cmd(["-n", "2", "-x", "MESHTRAIN_COMM_TIMEOUT=8", mt],
                   ["--mca oob_tcp_keepalive_probes 3", "-x MESHTRAIN_COMM_TIMEOUT=8"])
        if "keepalive" in " ".join(expect_cmd(["--node-timeout", "0", mt], [])):
            fail("--node-timeout 0 still set keepalives")
        # --gpus auto counts this node's GPUs with nvidia-smi (a stand-in here: no GPU).
        fake = f"{tmp}/bin"
        os.makedirs(fake)
        with open(f"{fake}/nvidia-smi", "w") as f:
            f.write("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
        os.chmod(f"{fake}/nvidia-smi", stat.S_IRWXU)
        path = {"PATH": f"{fake}:{os.environ['PATH']}"}
        expect_cmd(["--hosts", "a,b", "--gpus", "auto", mt], ["-np 8", "--map-by ppr:4:node"],
                   env=path)
        # A dry run may prepare a command for other machines: a program missing here is a warning.
        p = mtrun(["--dry-run", "--hosts", "a,b", "/opt/elsewhere/meshtrain", "train"])
        if p.returncode != 0 or "not an executable here" not in p.stderr:
            fail(f"dry run for a program that lives elsewhere: {p.returncode}\n{p.stderr}")
        # meshtrain gets the run directory only where the user set none.
        got = expect_cmd([mt, "train", "--set", "run.dir=mine"], [])
        if got.count("--set") != 1:
            fail(f"run.dir given twice: {got}")

        # A real job: 2 ranks through mtrun, its run directory, the printed command saved.
        run = f"{tmp}/job"
        p = mtrun(["-n", "2", "--threads", "1", "--oversubscribe", "--run-dir", run, mt, "train",
                   "--quiet", "--set", "model.preset=gpt-tiny", "--set", "train.steps=3",
                   "--set", "train.seq_len=32", "--set", "sample.tokens=0",
                   "--set", "eval.every=0"], timeout=240)
        if p.returncode != 0:
            fail(f"2-rank job exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        for f in ("mtrun.cmd", "env", "output.log", "metrics.jsonl", "config.toml",
                  "model.safetensors"):
            if not os.path.exists(f"{run}/{f}"):
                fail(f"run directory lacks {f}: {os.listdir(run)}")
        if open(f"{run}/mtrun.cmd").read().strip() != " ".join(shlex.quote(w) for w in command_of(p)) \
                and shlex.split(open(f"{run}/mtrun.cmd").read()) != command_of(p):
            fail("mtrun.cmd differs from the printed command")
        if "2 ranks: DP 2" not in open(f"{run}/output.log").read():
            fail(f"output.log lacks the 2-rank banner:\n{open(f'{run}/output.log').read()}")
        if "MESHTRAIN_THREADS=1" not in open(f"{run}/env").read():
            fail("env lacks MESHTRAIN_THREADS=1")
        # A failing program: mtrun passes its status on and names the log.
        p = mtrun(["-n", "1", "--run-dir", f"{tmp}/bad", mt, "train", "--set", "train.steps=-1"])
        if p.returncode == 0 or "output.log" not in p.stderr:
            fail(f"a failing job: exit {p.returncode}\n{p.stderr}")

        # Bad arguments: exit 2, a message naming what was wrong, nothing created.
        bad_dir = f"{tmp}/never"
        expect_error(["--bogus", mt], ["unknown option '--bogus'"])
        expect_error([], ["no program to run"])
        expect_error(["no-such-program-xyz"], ["'no-such-program-xyz' not found"])
        expect_error(["-n", "0", mt], ["-n '0'", "positive integer"])
        expect_error(["-n", "two", mt], ["-n 'two'"])
        # The ranks' time between mpirun's SIGTERM and its SIGKILL (graceful preemption).
        expect_cmd(["-n", "2", mt], ["--mca odls_base_sigkill_timeout 3"])
        expect_cmd(["-n", "2", "--stop-timeout", "30", mt], ["--mca odls_base_sigkill_timeout 30"])
        expect_error(["--stop-timeout", "0", mt], ["--stop-timeout '0'", "positive integer"])
        expect_error(["--threads"], ["--threads needs a value"])
        expect_error(["--bind", "cores", mt], ["--bind 'cores'", "core, socket, numa or none"])
        expect_error(["--hosts", "a,a", mt], ["host 'a' is listed twice"])
        expect_error(["--hosts", "a b", mt], ["host 'a b' is not a host name"])
        expect_error(["--hosts", "a", "--hostfile", f"{tmp}/hosts", mt], ["not both"])
        expect_error(["--hostfile", f"{tmp}/missing", mt], ["missing': cannot read it"])
        with open(f"{tmp}/badhosts", "w") as f:
            f.write("nodeA slots=4\nnodeB slots=x\n")
        expect_error(["--hostfile", f"{tmp}/badhosts", mt], ["badhosts:2", "slots=x"])
        with open(f"{tmp}/badhosts", "w") as f:
            f.write("nodeA cpus=4\n")
        expect_error(["--hostfile", f"{tmp}/badhosts", mt], ["badhosts:1", "unknown field 'cpus=4'"])
        expect_error(["--hostfile", f"{tmp}/hosts", "--per-node", "8", mt],
                     ["'nodeA' has 4 slot(s), fewer than --per-node 8"])
        expect_error(["--hosts", "a,b", "-n", "5", "--per-node", "2", mt], ["-n 5", "2 node(s) x 2"])
        expect_error(["--gpus", "4", "--per-node", "8", mt], ["ranks would share GPUs"])
        expect_error(["--gpus", "auto", mt], ["--gpus auto"], env={"PATH": "/usr/bin:/bin"})
        expect_error(["--oversubscribe", "--bind", "core", mt], ["cannot be bound"])
        expect_error(["-x", "1BAD=2", mt], ["-x '1BAD=2'"])
        expect_error(["--net", "eth0;rm", mt], ["--net 'eth0;rm'"])
        expect_error(["--mpirun", "/nonexistent/mpirun", "--run-dir", bad_dir, mt],
                     ["mpirun '/nonexistent/mpirun' not found"])
        os.makedirs(f"{tmp}/full")
        open(f"{tmp}/full/x", "w").close()
        expect_error(["--run-dir", f"{tmp}/full", mt], ["exists and is not empty"])
        if os.path.exists(bad_dir):
            fail("a rejected command created its run directory")
    print("ok: mtrun commands for one node, host lists, hostfiles, GPUs; a 2-rank job; 23 bad arguments")


if __name__ == "__main__":
    main()
