"""Checkpoints through the CLI on one process, as a user runs them:
- resume is bit-exact in fp32, bf16 and fp16 (losses and final weights equal an uninterrupted run);
- checkpoint.keep keeps the newest N, --resume latest picks the newest;
- a SIGKILL while a checkpoint is being written, repeated, loses no checkpoint: the previous
  one stays complete, `latest` picks it, and the job resumed after every kill ends with the
  uninterrupted run's losses;
- a corrupt, truncated or mismatched checkpoint stops the job before any step with an error
  naming the problem, and nothing in the run directory changes;
- resuming in a run directory from an earlier checkpoint leaves metrics.jsonl with one history:
  the records after the checkpoint's step are dropped before the run continues, and the newer
  checkpoints of the abandoned history are set aside whole (never overwritten);
- an edited manifest (its step changed, or any field without resealing its checksum) is refused
  before anything is written."""
import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from ckpt_util import (TINY, compare_losses, fail, losses, run, same_weights, seal_manifest, tree_digest)


def train(mt, run_dir, extra=(), expect_ok=True, resume=None):
    args = [mt, "train", "--quiet", *TINY, "--set", "train.batch_size=2", "--set", f"run.dir={run_dir}",
            *extra]
    if resume is not None:
        args += ["--resume", resume]
    return run(args, expect_ok=expect_ok)


def ckpts(run_dir):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoints", "*")))


def bit_exact(mt, tmp, precision):
    cfg = ("--set", "train.steps=10", "--set", f"train.precision={precision}", "--set", "checkpoint.every=3",
           "--set", "checkpoint.keep=0")
    ref = os.path.join(tmp, f"ref-{precision}")
    train(mt, ref, cfg)
    if ckpts(ref) != ["step_00000003", "step_00000006", "step_00000009", "step_00000010"]:
        fail(f"{precision}: checkpoints {ckpts(ref)}, expected steps 3, 6, 9 and 10")
    # Resume step 6 into another run directory: the checkpoint's config is the base.
    res = os.path.join(tmp, f"res-{precision}")
    p = train(mt, res, resume=os.path.join(ref, "checkpoints", "step_00000006"))
    got, want = losses(res), losses(ref)
    if sorted(got) != [7, 8, 9, 10]:
        fail(f"{precision}: the resumed run logged steps {sorted(got)}, expected 7 to 10")
    compare_losses(want, got, range(7, 11), what=f"{precision} resume from step 6")
    if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(res, "model.safetensors")):
        fail(f"{precision}: final weights after resuming differ from the uninterrupted run's")
    return ref


def metrics_after_resume(mt, tmp, ref):
    """Resuming in the run directory from an earlier checkpoint rewrites metrics.jsonl to the
    records up to the checkpoint's step (a torn last line dropped too): each step once."""
    d = os.path.join(tmp, "metrics-resume")
    shutil.copytree(ref, d)
    path = os.path.join(d, "metrics.jsonl")
    old = [json.loads(line) for line in open(path)]
    with open(path, "a") as f:
        f.write('{"step": 10, "loss": 1.2')  # a line torn by a kill
    later = sum(1 for r in old if r.get("step", 0) > 6) + 1
    newer = {c: tree_digest(os.path.join(d, "checkpoints", c)) for c in ("step_00000009", "step_00000010")}
    p = train(mt, d, resume=os.path.join(d, "checkpoints", "step_00000006"))
    # The checkpoints of the abandoned history (9 and 10) are set aside whole, not overwritten by
    # the new 9 and 10, and the log says where.
    aside = glob.glob(os.path.join(d, "checkpoints", "superseded-*"))
    if len(aside) != 1 or "moved (kept, not deleted)" not in p.stderr:
        fail(f"resume in place from step 6: expected steps 9 and 10 set aside in one superseded-* "
             f"directory, found {ckpts(d)}:\n{p.stderr}")
    for c, digest in newer.items():
        if tree_digest(os.path.join(aside[0], c)) != digest:
            fail(f"resume in place from step 6: the old {c} was not kept intact in {aside[0]}")
    if ckpts(d) != sorted(["step_00000006", "step_00000009", "step_00000010", "step_00000003",
                           os.path.basename(aside[0])]):
        fail(f"resume in place from step 6: checkpoints {ckpts(d)}")
    if f"dropped {later} record(s) after step 6" not in p.stderr:
        fail(f"resume in place: expected the log to say {later} records were dropped, got:\n{p.stderr}")
    if os.path.exists(path + ".tmp"):
        fail("resume in place left metrics.jsonl.tmp behind")
    recs = [json.loads(line) for line in open(path)]
    if recs[: len(old) - later + 1] != [r for r in old if r.get("step", 0) <= 6]:
        fail("resume in place changed the records up to the checkpoint's step")
    steps = [r["step"] for r in recs if "loss" in r]
    if steps != list(range(1, 11)):
        fail(f"after resuming at step 6 in place, metrics.jsonl has loss records for steps {steps}, "
             f"expected 1 to 10 once each")
    compare_losses(losses(ref), losses(d), range(1, 11), what="resume in place from step 6")
    # Resuming from the newest checkpoint drops nothing and leaves the file alone.
    before = open(path).read()
    p = train(mt, d, ("--set", "train.steps=11"), resume="latest")
    if "dropped" in p.stderr or not open(path).read().startswith(before):
        fail(f"resuming from the newest checkpoint rewrote metrics.jsonl:\n{p.stderr}")


def keep_and_latest(mt, tmp):
    d = os.path.join(tmp, "keep")
    train(mt, d, ("--set", "train.steps=9", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2"))
    if ckpts(d) != ["step_00000008", "step_00000009"]:
        fail(f"checkpoint.keep=2 left {ckpts(d)}, expected steps 8 and 9")
    # latest: continue the same run directory to 11 steps (a longer schedule: not compared).
    train(mt, d, ("--set", "train.steps=11"), resume="latest")
    steps = sorted(losses(d))
    if steps[-2:] != [10, 11]:
        fail(f"--resume latest did not continue at step 10: steps {steps}")


def corrupt(mt, tmp, ref):
    """Each broken checkpoint: non-zero exit, a clear message, no step run, nothing changed."""
    cases = []

    def flip(d):
        f = os.path.join(d, "shard-00000.safetensors")
        b = bytearray(open(f, "rb").read())
        b[len(b) // 2] ^= 0x40
        open(f, "wb").write(bytes(b))

    def truncate(d):
        f = os.path.join(d, "shard-00000.safetensors")
        os.truncate(f, os.path.getsize(f) - 100)

    def bad_json(d):
        f = os.path.join(d, "manifest.json")
        t = open(f).read()
        open(f, "w").write(t[: len(t) // 2])

    def no_manifest(d):
        os.remove(os.path.join(d, "manifest.json"))

    def wrong_shape(d):
        import json
        f = os.path.join(d, "manifest.json")
        m = json.load(open(f))
        m["tensors"]["wpe.weight"]["shape"] = [32, 64]
        for p in m["pieces"]:
            if p["tensor"] == "wpe.weight":
                p["shape"] = [32, 64]
                p["flat"] = [0, 32 * 64]
        seal_manifest(f, m)

    def hole(d):
        import json
        f = os.path.join(d, "manifest.json")
        m = json.load(open(f))
        m["pieces"] = [p for p in m["pieces"] if not (p["tensor"] == "h.1.ln_2.bias" and p["kind"] == "adam_v")]
        seal_manifest(f, m)

    def edited_step(d):
        # The probe's edit: step 6 -> 4 inside step_00000006 (sealed or not, it is refused).
        import json
        f = os.path.join(d, "manifest.json")
        m = json.load(open(f))
        m["step"] = 4
        seal_manifest(f, m)

    def unsealed(d):
        import json
        f = os.path.join(d, "manifest.json")
        m = json.load(open(f))
        m["state"]["data"]["skip_steps"] = 1
        json.dump(m, open(f, "w"))

    cases = [(flip, "CRC-32C"), (truncate, "bytes, the manifest says"), (bad_json, "not valid JSON"),
             (no_manifest, "no manifest.json"), (wrong_shape, "the model expects [64, 64]"),
             (hole, "no piece holds element"),
             (edited_step, "step is 4, but its directory is 'step_00000006'"),
             (unsealed, "manifest_crc32c is")]
    for i, (break_it, message) in enumerate(cases):
        d = os.path.join(tmp, f"corrupt{i}")
        shutil.copytree(ref, d)
        ck = os.path.join(d, "checkpoints", "step_00000006")
        break_it(ck)
        before = tree_digest(d)
        p = train(mt, d, expect_ok=False, resume=ck)
        if message not in p.stderr:
            fail(f"{break_it.__name__}: expected '{message}' in the error, got:\n{p.stderr}")
        if "step " in p.stdout:
            fail(f"{break_it.__name__}: steps ran before the error:\n{p.stdout}")
        if tree_digest(d) != before:
            fail(f"{break_it.__name__}: the failed resume changed files in the run directory")
    # Another model's checkpoint.
    d = os.path.join(tmp, "othermodel")
    shutil.copytree(ref, d)
    before = tree_digest(d)
    p = train(mt, d, ("--set", "model.n_layer=3"), expect_ok=False, resume="latest")
    if "holds another model: model.n_layer is 2 there and 3 here" not in p.stderr:
        fail(f"another model's checkpoint: unexpected error:\n{p.stderr}")
    if tree_digest(d) != before:
        fail("another model's checkpoint: the failed resume changed files")
    p = train(mt, os.path.join(tmp, "none"), expect_ok=False, resume="latest")
    if "no complete checkpoint under" not in p.stderr:
        fail(f"--resume latest without checkpoints: unexpected error:\n{p.stderr}")


def kill_during_write(mt, tmp):
    """SIGKILL the job while it writes a checkpoint, three times; then let it finish."""
    cfg = ["--set", "model.preset=gpt-small", "--set", "train.seq_len=32", "--set", "train.batch_size=1",
           "--set", "train.threads=1", "--set", "sample.tokens=0", "--set", "eval.every=0",
           "--set", "train.steps=12", "--set", "checkpoint.every=2", "--set", "checkpoint.keep=2",
           "--set", "train.precision=fp32"]
    ref = os.path.join(tmp, "kill-ref")
    run([mt, "train", "--quiet", *cfg, "--set", f"run.dir={ref}"])
    d = os.path.join(tmp, "kill")
    root = os.path.join(d, "checkpoints")
    kills = mid_write = 0
    for attempt in range(3):
        before = ckpts(d) if os.path.isdir(root) else []
        proc = subprocess.Popen([mt, "train", "--quiet", *cfg, "--set", f"run.dir={d}", "--resume", "auto"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        victim = None
        while time.time() < deadline and proc.poll() is None:
            # Once this attempt has published a checkpoint, a shard file appearing in a temporary
            # directory: the next write is under way.
            now = [c for c in ckpts(d) if c.startswith("step_")] if os.path.isdir(root) else []
            tmps = glob.glob(os.path.join(root, ".tmp-step_*", "shard-*"))
            if set(now) - set(before) and tmps:
                proc.send_signal(signal.SIGKILL)
                victim = os.path.basename(os.path.dirname(tmps[0]))[5:]
                published = max(now)
                break
            time.sleep(0.002)
        proc.wait()
        if victim is None:
            fail(f"attempt {attempt}: the job ended ({proc.returncode}) before a checkpoint write "
                 f"could be interrupted\n{proc.stderr.read().decode()[-2000:]}")
        proc.stderr.close()
        kills += 1
        complete = [c for c in ckpts(d) if c.startswith("step_")]
        # The checkpoint published before the kill is still there and is what latest picks (the
        # interrupted one, unless its rename had happened just before the kill).
        if published not in complete or max(complete) not in (published, victim):
            fail(f"kill {kills} during the write of {victim}: checkpoints left {ckpts(d)}, "
                 f"expected {published} to survive")
        mid_write += victim not in complete
        for c in complete:
            if not os.path.exists(os.path.join(root, c, "manifest.json")):
                fail(f"{c} is published without its manifest")
    # Resume after the last kill and run to the end: the surviving checkpoints are valid (every
    # file is checksummed on load), and the losses are the uninterrupted run's.
    p = run([mt, "train", "--quiet", *cfg, "--set", f"run.dir={d}", "--resume", "latest"])
    compare_losses(losses(ref), losses(d), range(1, 13), what="resumed after repeated kills")
    steps = [r["step"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "loss" in r]
    if steps != list(range(1, 13)):
        fail(f"after {kills} kills and resumes, metrics.jsonl has loss records for steps {steps}, "
             f"expected 1 to 12 once each")
    if not same_weights(os.path.join(ref, "model.safetensors"), os.path.join(d, "model.safetensors")):
        fail("final weights after repeated kills differ from the uninterrupted run's")
    if mid_write == 0:
        fail(f"none of the {kills} kills landed inside a checkpoint write")
    return mid_write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        refs = {p: bit_exact(a.meshtrain, tmp, p) for p in ("fp32", "bf16", "fp16")}
        metrics_after_resume(a.meshtrain, tmp, refs["fp32"])
        keep_and_latest(a.meshtrain, tmp)
        corrupt(a.meshtrain, tmp, refs["bf16"])
        kills = kill_during_write(a.meshtrain, tmp)
    print(f"ok: bit-exact resume (fp32, bf16, fp16), keep/latest, 7 broken checkpoints refused, "
          f"{kills} kills inside checkpoint writes lost nothing")


if __name__ == "__main__":
    main()
