#!/usr/bin/python3
"""Bad input, bad places and scarce resources, as a user meets them (issue 16): every case must
exit non-zero with a message naming what and where (the path, the errno text, the numbers), never
hang or crash, and leave nothing behind (no run directory, no checkpoint directory, no partial
file).

  - paths that are not regular files: --config DIR (std::ifstream read a directory as an empty
    file and trained on the defaults), a FIFO (open(2) blocked forever), /dev/zero, a config file
    too large; data files, model.init, --resume, import's config.json likewise;
  - a run directory on a read-only file system, and on a full one (the built-in corpus, and
    metrics.jsonl running out of space mid-run): the first failed write stops the run naming the
    path and errno (tmpfs mounts, made when the test may mount: otherwise those cases are
    reported skipped, never passed);
  - a token id outside the vocabulary: the file, token index and byte offset, and advice that
    does not repeat the setting already in use;
  - a model too large for this machine's memory: refused before allocating, with the plan's
    figures and what would fit;
  - refusals (a bad --resume, a missing model.init) leave no run directory;
  - import/export into a non-empty directory: refused without --force;
  - a resumed run peaks no higher in memory than a fresh one.

    test_robustness.py --meshtrain PATH/meshtrain
"""
import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

MESHTRAIN = None

TINY = ["--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32", "--set",
        "train.batch_size=2", "--set", "train.threads=1", "--set", "sample.tokens=0",
        "--set", "eval.every=0"]


def run(*args, timeout=120, env=None):
    r = subprocess.run(list(args), capture_output=True, timeout=timeout, env=env)
    r.out = r.stdout.decode("utf-8", "replace")
    r.err = r.stderr.decode("utf-8", "replace")
    return r


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


class Mount:
    """A tmpfs of `size` at `path`, or the reason it cannot be mounted (not root)."""

    def __init__(self, path, size):
        self.path = path
        os.makedirs(path, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                           capture_output=True, text=True)
        self.why = None if r.returncode == 0 else f"cannot mount a tmpfs: {r.stderr.strip()}"

    def read_only(self):
        subprocess.run(["mount", "-o", "remount,ro", self.path], check=True)

    def close(self):
        if self.why is None:
            subprocess.run(["umount", "-l", self.path])


class Robustness(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="mt_robust_")
        cls.corpus = os.path.join(cls.tmp, "corpus.txt")
        with open(cls.corpus, "w") as f:
            f.write("the cat sat on the mat\na dog ran far away\n" * 200)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def expect_error(self, args, *fragments, env=None, timeout=60):
        r = run(MESHTRAIN, *args, env=env, timeout=timeout)
        what = f"meshtrain {' '.join(args)}"
        self.assertNotEqual(r.returncode, 0, f"{what} succeeded:\n{r.out}{r.err}")
        for frag in fragments:
            self.assertIn(frag, r.err, f"{what}: stderr lacks {frag!r}:\n{r.err}")
        for crash in ("terminate called", "Segmentation", "Aborted", "unexpected error",
                      "bad_alloc"):
            self.assertNotIn(crash, r.err, what)
        return r

    def expect_nothing_written(self, run_dir, what):
        self.assertFalse(os.path.exists(run_dir), f"{what}: left {run_dir} behind")

    def train(self, run_dir, *extra, env=None, timeout=300):
        r = run(MESHTRAIN, "train", "--quiet", *TINY, "--set", f"run.dir={run_dir}", *extra,
                env=env, timeout=timeout)
        self.assertEqual(r.returncode, 0, f"train {extra} failed:\n{r.out}{r.err}")
        return r

    # ---- item 2: paths that are not regular files ------------------------------------------

    def test_config_that_is_not_a_file(self):
        d = self.path("a_dir")
        os.makedirs(d, exist_ok=True)
        fifo = self.path("a_fifo.toml")
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        big = self.path("big.toml")
        with open(big, "wb") as f:
            f.truncate(17 << 20)  # sparse: 17 MiB of zeros
        run_dir = self.path("cfg_run")
        for cfg, frag in ((d, "a directory, not a regular file"),
                          (fifo, "a FIFO, not a regular file"),
                          ("/dev/zero", "a character device, not a regular file"),
                          (big, "more than the")):
            # A FIFO must be refused at once, not wait for a writer (the timeout would fire).
            self.expect_error(["train", "--config", cfg, "--set", f"run.dir={run_dir}"],
                              f"config file '{cfg}'", frag, timeout=30)
            self.expect_nothing_written(run_dir, f"--config {cfg}")
            self.expect_error(["plan", "--config", cfg], f"config file '{cfg}'", frag, timeout=30)

    def test_data_model_init_and_resume_that_are_not_files(self):
        d = self.path("data_dir")
        os.makedirs(d, exist_ok=True)
        fifo = self.path("data_fifo.txt")
        if not os.path.exists(fifo):
            os.mkfifo(fifo)
        run_dir = self.path("data_run")
        for bad, frag in ((d, "a directory"), (fifo, "a FIFO"), ("/dev/zero", "a character device")):
            self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}",
                               "--set", f"data.train={bad}"], f"data file '{bad}' is {frag}",
                              timeout=30)
            self.expect_nothing_written(run_dir, f"data.train={bad}")
            self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}",
                               "--set", f"model.init={bad}"],
                              f"safetensors file '{bad}' is {frag}", timeout=30)
            self.expect_nothing_written(run_dir, f"model.init={bad}")
        self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}", "--resume", self.corpus],
                          f"--resume '{self.corpus}' is not a directory")
        self.expect_nothing_written(run_dir, "--resume FILE")
        # A checkpoint directory whose manifest is a FIFO.
        ck = self.path("fake_ckpt")
        os.makedirs(ck, exist_ok=True)
        if not os.path.exists(os.path.join(ck, "manifest.json")):
            os.mkfifo(os.path.join(ck, "manifest.json"))
        self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}",
                           "--config", self.write_tiny_config(run_dir), "--resume", ck],
                          "manifest", "a FIFO", timeout=30)
        self.expect_nothing_written(run_dir, "--resume with a FIFO manifest")
        # import: config.json a directory.
        hf = self.path("hf_bad")
        os.makedirs(os.path.join(hf, "config.json"), exist_ok=True)
        open(os.path.join(hf, "model.safetensors"), "wb").close()
        self.expect_error(["import", "--hf", hf, "--out", self.path("imp_bad")],
                          "config.json", "a directory, not a regular file")
        self.expect_nothing_written(self.path("imp_bad"), "import of a bad model")

    def write_tiny_config(self, run_dir):
        p = self.path("tiny_for_resume.toml")
        with open(p, "w") as f:
            f.write(f'[model]\npreset = "gpt-tiny"\n[run]\ndir = "{run_dir}"\n')
        return p

    # ---- items 4 and 5: read-only and full file systems -------------------------------------

    def test_read_only_run_directory(self):
        m = Mount(self.path("ro"), "4m")
        if m.why:
            self.skipTest(m.why)
        try:
            os.makedirs(os.path.join(m.path, "run"))
            m.read_only()
            for where, extra in ((os.path.join(m.path, "run"), []),       # exists, read-only
                                 (os.path.join(m.path, "new", "run"), [])):  # to be created
                r = self.expect_error(["train", *TINY, "--set", f"run.dir={where}", *extra],
                                      "Read-only file system", "errno 30")
                self.assertIn(m.path, r.err)
                self.assertNotIn("No such file or directory", r.err, r.err)
                # With data given, the first write is config.toml: named with its errno.
                r = self.expect_error(["train", *TINY, "--set", f"run.dir={where}",
                                       "--set", f"data.train={self.corpus}"],
                                      "Read-only file system", "errno 30")
                self.assertIn(m.path, r.err)
        finally:
            m.close()

    def test_full_disk_stops_at_the_first_failed_write(self):
        m = Mount(self.path("full"), "1m")  # the built-in corpus is 2.4 MB
        if m.why:
            self.skipTest(m.why)
        try:
            run_dir = os.path.join(m.path, "run")
            r = self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}"],
                                  "default_corpus.txt", "No space left on device", "errno 28")
            # The run directory this run created is removed again: nothing half-written.
            self.expect_nothing_written(run_dir, "a full disk")
            # metrics.jsonl running out of space mid-run: fill the disk to a few KiB free.
            shutil.rmtree(run_dir, ignore_errors=True)
            st = os.statvfs(m.path)
            with open(os.path.join(m.path, "filler"), "wb") as f:
                f.write(b"x" * (st.f_bavail * st.f_frsize - 12 * 1024))
            r = self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}",
                                   "--set", f"data.train={self.corpus}", "--set", "train.steps=400"],
                                  "metrics.jsonl", "No space left on device", "errno 28",
                                  timeout=300)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                steps = [json.loads(l)["step"] for l in f if l.strip()]
            self.assertLess(max(steps), 400, "the run went on after metrics.jsonl filled the disk")
            self.assertFalse(os.path.exists(os.path.join(run_dir, "model.safetensors")))
        finally:
            m.close()

    # ---- item 6: token ids outside the vocabulary -------------------------------------------

    def test_token_outside_the_vocabulary(self):
        shard = self.path("ids65000.bin")
        tokens = [i % 1000 for i in range(3000)]
        tokens[1234] = 65000
        with open(shard, "wb") as f:
            f.write(struct.pack("<3i", 20240520, 1, len(tokens)) + bytes(1012))
            f.write(struct.pack(f"<{len(tokens)}H", *tokens))
        run_dir = self.path("vocab_run")
        r = self.expect_error(["train", *TINY, "--set", "model.vocab=gpt2", "--set",
                               f"data.train={shard}", "--set", f"run.dir={run_dir}"],
                              f"token shard '{shard}' holds token id 65000 at token 1234 (byte "
                              f"offset {1024 + 2 * 1234})", "vocabulary of 50257",
                              "another tokenizer or vocabulary")
        self.assertNotIn('need model.vocab = "gpt2"', r.err, "advice repeats the setting in use")
        self.expect_nothing_written(run_dir, "a shard outside the vocabulary")

    # ---- item 3: a model too large for this machine -----------------------------------------

    def test_model_too_large_is_refused_before_allocating(self):
        run_dir = self.path("huge_run")
        r = self.expect_error(["train", "--set", "model.preset=gpt2-xl", "--set", "model.n_layer=480",
                               "--set", f"run.dir={run_dir}"],
                              "not enough memory: the plan needs", "per rank",
                              "parameters", "AdamW state", "activations",
                              "MemAvailable", "Nothing was allocated or written")
        self.assertTrue("What would fit" in r.err or "No layout within reach fits" in r.err, r.err)
        self.expect_nothing_written(run_dir, "a model too large")
        # A batch too large for the memory: a smaller micro-batch with accumulation would fit.
        avail = mem_available()
        if avail is None:
            self.skipTest("no MemAvailable in /proc/meminfo")
        plan = run(MESHTRAIN, "plan", "--model", "gpt-small", "--seq", "256", "--batch", "64")
        act = re.search(r"activations\s+([\d.]+) (\w+)", plan.out)
        unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
        per_row = float(act.group(1)) * unit[act.group(2)] / 64
        batch = int(3 * avail / per_row) + 1
        r = self.expect_error(["train", "--set", "model.preset=gpt-small", "--set",
                               "train.seq_len=256", "--set", f"train.batch_size={batch}",
                               "--set", f"run.dir={run_dir}"],
                              "not enough memory", f"micro-batch of {batch} x 256",
                              "train.batch_size = ", "train.grad_accum = ")
        self.expect_nothing_written(run_dir, "a batch too large")
        # MESHTRAIN_MEMORY_CHECK=0 lets the user overrule the check (here on a config that would
        # fit anyway: the check's switch, not the allocation, is what is tested).
        env = dict(os.environ, MESHTRAIN_MEMORY_CHECK="0")
        self.train(self.path("nocheck_run"), "--set", "train.steps=1", env=env)

    def test_plan_agrees_with_peak_rss(self):
        """What `plan` says a rank needs is what a run takes: the peak RSS of a run, less that of
        a gpt-tiny run (the process's own baseline: binary, libraries, MPI-free start-up, the
        data), within 10% of the plan's total (less gpt-tiny's); measured: 1-2%."""
        unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

        def plan_total(preset, seq, batch, precision):
            p = run(MESHTRAIN, "plan", "--model", preset, "--seq", str(seq), "--batch", str(batch),
                    "--precision", precision)
            m = re.search(r"total\s+([\d.]+) (\w+)", p.out)
            return float(m.group(1)) * unit[m.group(2)] / (1 << 20)

        def peak(preset, seq, batch, precision):
            run_dir = self.path(f"plan_{preset}_{seq}_{batch}_{precision}")
            self.train(run_dir, "--set", f"model.preset={preset}", "--set", f"train.seq_len={seq}",
                       "--set", f"train.batch_size={batch}", "--set", f"train.precision={precision}",
                       "--set", "train.steps=2")
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                return [json.loads(l) for l in f if "peak_rss_mib" in l][-1]["peak_rss_mib"][0]

        for precision in ("bf16", "fp32"):
            base_plan, base_rss = plan_total("gpt-tiny", 32, 2, precision), peak("gpt-tiny", 32, 2, precision)
            for seq, batch in ((64, 2), (128, 8)):
                want = plan_total("gpt-small", seq, batch, precision) - base_plan
                got = peak("gpt-small", seq, batch, precision) - base_rss
                print(f"{precision} gpt-small {batch} x {seq}: plan {want:.0f} MiB, "
                      f"peak RSS above gpt-tiny's {got:.0f} MiB")
                self.assertLess(abs(got - want), 0.10 * want,
                                f"{precision} {batch} x {seq}: plan {want:.0f} MiB, run {got:.0f}")

    # ---- item 9: refusals write nothing --------------------------------------------------------

    def test_refusals_leave_no_run_directory(self):
        run_dir = self.path("refused_run")
        # model.init missing, with the built-in corpus (which used to be written first).
        self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}",
                           "--set", f"model.init={self.path('missing.safetensors')}"],
                          "missing.safetensors")
        self.expect_nothing_written(run_dir, "a missing model.init")
        # --resume of another model's checkpoint: read and refused before anything is created.
        src = self.path("src_run")
        self.train(src, "--set", "train.steps=2", "--set", "checkpoint.every=1")
        ck = os.path.join(src, "checkpoints", "step_00000002")
        self.assertTrue(os.path.isdir(ck))
        self.expect_error(["train", "--config", os.path.join(ck, "config.toml"), "--set",
                           f"run.dir={run_dir}", "--set", "model.n_layer=7", "--resume", ck],
                          "holds another model")
        self.expect_nothing_written(run_dir, "a refused --resume")
        # A corrupt checkpoint, resumed into a new run directory with its own checkpoint dir.
        bad = self.path("bad_ckpt")
        shutil.copytree(ck, bad)
        shard = os.path.join(bad, "shard-00000.safetensors")
        with open(shard, "r+b") as f:
            f.seek(os.path.getsize(shard) - 100)
            f.write(b"\xff" * 8)
        ckdir = self.path("refused_ckpts")
        self.expect_error(["train", *TINY, "--set", f"run.dir={run_dir}", "--set",
                           f"checkpoint.dir={ckdir}", "--resume", bad], "corrupt")
        self.expect_nothing_written(run_dir, "a corrupt checkpoint")
        self.expect_nothing_written(ckdir, "a corrupt checkpoint")

    # ---- item 10: import and export into a non-empty directory ------------------------------

    def test_import_export_refuse_a_non_empty_target(self):
        src = self.path("exp_src")
        self.train(src, "--set", "train.steps=1")
        hf = self.path("hf_out")
        r = run(MESHTRAIN, "export", "--run", src, "--hf", hf)
        self.assertEqual(r.returncode, 0, r.err)
        def config_json():
            with open(os.path.join(hf, "config.json")) as f:
                return f.read()

        before = config_json()
        # export again into the same (non-empty) directory: refused, unchanged.
        self.expect_error(["export", "--run", src, "--hf", hf], f"'{hf}' is not empty",
                          "config.json", "model.safetensors", "--force")
        self.assertEqual(before, config_json())
        r = run(MESHTRAIN, "export", "--run", src, "--hf", hf, "--force")
        self.assertEqual(r.returncode, 0, r.err)
        self.assertIn("replacing config.json, model.safetensors", r.out)
        # import into an existing run: refused, the run untouched; --force says what it leaves.
        weights = os.path.join(src, "model.safetensors")
        stamp = os.path.getmtime(weights)
        self.expect_error(["import", "--hf", hf, "--out", src], f"'{src}' is not empty",
                          "metrics.jsonl", "--force")
        self.assertEqual(stamp, os.path.getmtime(weights), "import replaced the run's weights")
        r = run(MESHTRAIN, "import", "--hf", hf, "--out", src, "--force")
        self.assertEqual(r.returncode, 0, r.err)
        self.assertIn("replacing config.toml, model.safetensors", r.out)
        self.assertIn("left as they are", r.out)
        self.assertIn("metrics.jsonl", r.out)
        # An empty or new directory needs no --force.
        fresh = self.path("imp_new")
        os.makedirs(fresh, exist_ok=True)
        r = run(MESHTRAIN, "import", "--hf", hf, "--out", fresh)
        self.assertEqual(r.returncode, 0, r.err)
        self.expect_error(["import", "--hf", hf, "--out", self.corpus], "is not a directory")

    # ---- item 13: a resume needs no more memory than a fresh run ---------------------------

    def test_resume_peaks_no_higher_than_a_fresh_run(self):
        # gpt-small (~11M parameters, 42 MiB per fp32 copy): the old resume held the checkpoint's
        # bytes and a scratch copy of master, m and v on top of the optimizer (+ ~250 MiB).
        args = ["--set", "model.preset=gpt-small", "--set", "train.seq_len=64", "--set",
                "train.batch_size=2", "--set", "train.threads=1", "--set", "sample.tokens=0",
                "--set", "eval.every=0", "--set", "checkpoint.every=2"]
        for precision in ("bf16", "fp32"):
            run_dir = self.path(f"rss_{precision}")
            p = ["--set", f"train.precision={precision}"]
            fresh = run(MESHTRAIN, "train", "--quiet", *args, *p, "--set", "train.steps=2",
                        "--set", f"run.dir={run_dir}", timeout=300)
            self.assertEqual(fresh.returncode, 0, fresh.err)
            resumed = run(MESHTRAIN, "train", "--quiet", *args, *p, "--set", "train.steps=3",
                          "--set", f"run.dir={run_dir}", "--resume", "latest", timeout=300)
            self.assertEqual(resumed.returncode, 0, resumed.err)
            with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                rss = [json.loads(l)["peak_rss_mib"][0] for l in f if "peak_rss_mib" in l]
            self.assertEqual(len(rss), 2, rss)
            # Margin: 5% + 16 MiB of allocator and page-cache noise; the old resume was +96%.
            self.assertLessEqual(rss[1], rss[0] * 1.05 + 16,
                                 f"{precision}: resumed peak {rss[1]:.0f} MiB vs fresh {rss[0]:.0f}")
            print(f"{precision}: peak RSS fresh {rss[0]:.0f} MiB, resumed {rss[1]:.0f} MiB")


def main():
    global MESHTRAIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    args, rest = ap.parse_known_args()
    MESHTRAIN = args.meshtrain
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
