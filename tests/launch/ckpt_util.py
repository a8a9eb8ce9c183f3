"""Helpers shared by the checkpoint tests: run meshtrain, read metrics and safetensors files."""
import json
import os
import struct
import subprocess
import sys

TINY = ["--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32", "--set", "train.threads=1",
        "--set", "sample.tokens=0", "--set", "eval.every=0", "--set", "dp.bucket_mb=0.05"]


def fail(msg):
    sys.exit(f"FAIL: {msg}")


# Lines of a job's output that say why it ended: glibc's heap checks, Open MPI's report of a
# rank that died on a signal, mpirun's and mtrun's verdicts, our own errors and stop messages.
_CAUSES = ("free()", "malloc", "corrupt", "double free", "*** Process received signal",
           "Signal:", "Signal code", "Failing at address", "exited on signal", "mpirun noticed",
           "mtrun:", "meshtrain:", "error", "stopped by", "Sanitizer")


def why(out, tail=3000):
    """The lines of `out` that name a cause (the first 40), then its last `tail` characters: a
    crash's first lines (glibc's message, the signal) scroll out of a tail of backtraces."""
    causes = [line for line in out.splitlines() if any(c in line for c in _CAUSES)][:40]
    head = "\n".join(["-- lines naming a cause:", *causes, "-- the end of the output:"]) if causes else ""
    return f"{head}\n{out[-tail:]}" if head else out[-tail:]


def run(args, expect_ok=True, timeout=240, env=None):
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok and p.returncode != 0:
        fail(f"{' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{why(p.stderr)}")
    if not expect_ok and p.returncode == 0:
        fail(f"{' '.join(args)} should have failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses(run_dir):
    """Step -> loss of the last record of each step (a rollback redoes steps)."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def read_safetensors(path):
    """name -> (dtype, shape, raw bytes)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        out[k] = (v["dtype"], v["shape"], data[b:e])
    return out


def same_weights(a, b):
    """Whether two model.safetensors files hold bit-identical tensors."""
    x, y = read_safetensors(a), read_safetensors(b)
    if x.keys() != y.keys():
        return False
    return all(x[k] == y[k] for k in x)


def max_weight_diff(a, b):
    import array
    x, y = read_safetensors(a), read_safetensors(b)
    worst = 0.0
    for k in x:
        assert x[k][0] == "F32" and y[k][0] == "F32"
        u, v = array.array("f", x[k][2]), array.array("f", y[k][2])
        worst = max(worst, max((abs(p - q) for p, q in zip(u, v)), default=0.0))
    return worst


def tree_digest(path):
    """(relative path, size, mtime_ns, bytes hash) of every file under path."""
    import hashlib
    out = []
    for root, _, files in os.walk(path):
        for f in sorted(files):
            p = os.path.join(root, f)
            st = os.stat(p)
            out.append((os.path.relpath(p, path), st.st_size, st.st_mtime_ns,
                        hashlib.sha256(open(p, "rb").read()).hexdigest()))
    return sorted(out)


def compare_losses(ref, got, steps, rel=0.0, what=""):
    for s in steps:
        if s not in ref or s not in got:
            fail(f"{what}: step {s} missing (reference has {sorted(ref)}, run has {sorted(got)})")
        x, y = ref[s], got[s]
        if (rel == 0.0 and x != y) or abs(x - y) > rel * abs(x):
            fail(f"{what}: step {s}: loss {y!r} differs from the uninterrupted run's {x!r}"
                 f"{'' if rel == 0 else f' by more than {rel:g} relative'}")


def seal_manifest(path, m):
    """Writes the manifest `m` (a dict) to `path` with its manifest_crc32c set to the checksum of
    its content, as parallel/checkpoint_manifest.hpp defines it: the CRC-32C of the object without
    that key, keys sorted, no whitespace. A deliberate edit seals the manifest; an unsealed one
    is refused."""
    content = {k: v for k, v in m.items() if k != "manifest_crc32c"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    m = dict(m, manifest_crc32c=f"{crc32c(text.encode()):08x}")
    with open(path, "w") as f:
        json.dump(m, f, indent=1)


def crc32c(data, crc=0):
    """CRC-32C (Castagnoli), bitwise: small manifests only."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF
