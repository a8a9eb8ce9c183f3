#!/usr/bin/python3
"""The meshtrain CLI as a user runs it.

A tiny `meshtrain train` run must write config.toml, metrics.jsonl and model.safetensors;
`meshtrain generate --run DIR` must print text; scripts/plot_metrics.py must render a PNG from
the run's metrics. Bad input must exit non-zero with a message naming the problem and leave
nothing half-written.

    test_cli.py --meshtrain PATH/meshtrain --plot scripts/plot_metrics.py
"""
import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import tomllib
import unittest

MESHTRAIN = None
PLOT = None

CONFIG = """\
[model]
preset = "gpt-tiny"

[data]
train = ["{corpus}"]
val_fraction = 0.1

[train]
steps = 8
batch_size = 4
seq_len = 32
warmup_steps = 2
threads = 1

[eval]
every = 4
batches = 2

[sample]
tokens = 32

[run]
dir = "{run}"
"""


def run(*args, check=False):
    r = subprocess.run(list(args), capture_output=True, timeout=120)
    r.out = r.stdout.decode("utf-8", "replace")
    r.err = r.stderr.decode("utf-8", "replace")
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {r.returncode}:\n{r.out}{r.err}")
    return r


def read_safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class Cli(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="mt_cli_")
        cls.corpus = os.path.join(cls.tmp, "corpus.txt")
        with open(cls.corpus, "w") as f:
            for i in range(300):
                f.write(["the cat sat on the mat\n", "a dog ran far away\n",
                         "to be or not to be\n"][i * 7 % 3])
        cls.run_dir = os.path.join(cls.tmp, "run")
        cls.config = cls.write_config("tiny.toml", cls.run_dir)
        cls.train = run(MESHTRAIN, "train", "--config", cls.config, check=True)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp)

    @classmethod
    def write_config(cls, name, run_dir, extra=""):
        path = os.path.join(cls.tmp, name)
        with open(path, "w") as f:
            f.write(CONFIG.format(corpus=cls.corpus, run=run_dir) + extra)
        return path

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    def expect_error(self, args, *fragments, rc=1):
        """Runs meshtrain with args; expects exit status rc and every fragment in stderr."""
        r = run(MESHTRAIN, *args)
        what = f"meshtrain {' '.join(args)}"
        self.assertEqual(r.returncode, rc, f"{what}: exit status\n{r.out}{r.err}")
        for frag in fragments:
            self.assertIn(frag, r.err, f"{what}: stderr lacks {frag!r}")
        # A clear message, not a crash.
        for crash in ("terminate called", "Segmentation", "Aborted", "unexpected error"):
            self.assertNotIn(crash, r.err, what)
        return r

    def expect_train_error(self, name, sets, *fragments, config=None):
        """A failing train run leaves no run directory behind."""
        run_dir = self.path(name)
        args = ["train", "--config", config or self.config, "--set", f"run.dir={run_dir}"]
        for s in sets:
            args += ["--set", s]
        self.expect_error(args, *fragments)
        self.assertFalse(os.path.exists(run_dir), f"{name}: a failed run left {run_dir} behind")

    # ---- a successful run ---------------------------------------------------------------

    def test_train_writes_the_run_directory(self):
        files = sorted(os.listdir(self.run_dir))
        self.assertEqual(files, ["config.toml", "metrics.jsonl", "model.safetensors"])
        self.assertIn("step 8/8", self.train.out)
        self.assertIn("done: 8 steps", self.train.out)
        # config.toml is TOML and holds the effective values.
        with open(self.path("run", "config.toml"), "rb") as f:
            cfg = tomllib.load(f)
        self.assertEqual(cfg["train"]["steps"], 8)
        self.assertEqual(cfg["model"]["preset"], "gpt-tiny")
        self.assertEqual(cfg["data"]["train"], [self.corpus])
        self.assertEqual(cfg["run"]["dir"], self.run_dir)
        # metrics.jsonl: every line a JSON object.
        records = []
        with open(self.path("run", "metrics.jsonl")) as f:
            for n, line in enumerate(f, 1):
                rec = json.loads(line)
                self.assertIsInstance(rec, dict, f"metrics.jsonl:{n}")
                records.append(rec)
        steps = [r for r in records if "loss" in r]
        self.assertEqual([r["step"] for r in steps], list(range(1, 9)))
        for r in steps:
            for key in ("lr", "grad_norm", "ms", "tokens_per_s", "mfu", "skipped"):
                self.assertIn(key, r)
        self.assertEqual([r["step"] for r in records if "val_loss" in r], [4, 8])
        self.assertEqual(len([r for r in records if "sample" in r]), 1)
        # model.safetensors: every parameter of the model, fp32.
        header = read_safetensors_header(self.path("run", "model.safetensors"))
        self.assertIn("wte.weight", header)
        self.assertEqual(header["wte.weight"]["shape"], [256, 64])
        self.assertEqual(len([k for k in header if k != "__metadata__"]), 2 + 2 * 12 + 2)

    def test_generate_prints_text(self):
        r = run(MESHTRAIN, "generate", "--run", self.run_dir, "--prompt", "the ", "--tokens", "40",
                "--seed", "3", check=True)
        self.assertTrue(r.stdout.startswith(b"the "), r.out)
        self.assertEqual(len(r.stdout), 4 + 40 + 1)  # prompt, 40 bytes, newline
        again = run(MESHTRAIN, "generate", "--run", self.run_dir, "--prompt", "the ", "--tokens",
                    "40", "--seed", "3", check=True)
        self.assertEqual(r.stdout, again.stdout, "same seed, same text")
        greedy = run(MESHTRAIN, "generate", "--run", self.run_dir, "--temperature", "0",
                     "--tokens", "10", check=True)
        self.assertEqual(len(greedy.stdout), 1 + 10 + 1)  # the default prompt is a newline

    def test_same_seed_gives_bit_identical_losses(self):
        other = self.path("run_again")
        run(MESHTRAIN, "train", "--config", self.config, "--quiet", "--set", f"run.dir={other}",
            check=True)

        def losses(d):
            with open(os.path.join(d, "metrics.jsonl")) as f:
                # The JSON text of each loss: equal text is an equal float.
                return [line.split('"loss":')[1].split(",")[0] for line in f if '"loss"' in line]

        self.assertEqual(losses(self.run_dir), losses(other))
        self.assertEqual(len(losses(other)), 8)

    def test_plot_renders_a_png(self):
        out = self.path("plot.png")
        r = subprocess.run([sys.executable, PLOT, self.run_dir, "--out", out],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(out, "rb") as f:
            data = f.read()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        width, height = struct.unpack(">II", data[16:24])
        self.assertEqual((width, height), (900, 700))
        self.assertGreater(len(data), 20000, "a PNG this small has no curves in it")
        # Without --out it goes next to the metrics.
        r = subprocess.run([sys.executable, PLOT, self.run_dir], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.exists(self.path("run", "metrics.png")))
        os.remove(self.path("run", "metrics.png"))
        # A directory without metrics is an error that says so.
        r = subprocess.run([sys.executable, PLOT, self.tmp], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 1)
        self.assertIn("metrics.jsonl", r.stderr)
        self.assertNotIn("Traceback", r.stderr)

    # ---- bad input ------------------------------------------------------------------------

    def test_bad_config_keys(self):
        bad = self.path("unknown_key.toml")
        with open(bad, "w") as f:
            f.write(CONFIG.format(corpus=self.corpus, run=self.path("bad_key"))
                    .replace("threads = 1", "threads = 1\nlrr = 0.1"))
        self.expect_train_error("bad_key", [], f"{bad}:14: unknown key 'train.lrr'", config=bad)
        wrong = self.path("wrong_type.toml")
        with open(wrong, "w") as f:
            f.write(CONFIG.format(corpus=self.corpus, run=self.path("bad_type"))
                    .replace("steps = 8", "steps = \"eight\""))
        self.expect_train_error("bad_type", [],
                                f"{wrong}:9: 'train.steps' must be an integer, got a string",
                                config=wrong)
        self.expect_train_error("bad_set", ["train.lr=fast"],
                                "--set train.lr: 'fast' is not a valid number")
        self.expect_train_error("bad_range", ["train.batch_size=0"],
                                "'train.batch_size' = 0 is out of range: expected 1 to")
        self.expect_error(["train", "--config", self.path("missing.toml")],
                          "cannot open config file", "missing.toml")
        self.expect_error(["train", "--bogus"], "train: unknown argument '--bogus'")
        self.expect_error(["train", "--config"], "--config needs a value")

    def test_bad_data(self):
        self.expect_train_error("no_data", [f"data.train={self.path('nope.txt')}"],
                                f"cannot open data file '{self.path('nope.txt')}'")
        magic = self.path("bad_magic.bin")
        with open(magic, "wb") as f:
            f.write(struct.pack("<3i", 12345, 1, 100) + bytes(1012) + bytes(200))
        self.expect_train_error("bad_magic", [f"data.train={magic}"],
                                f"'{magic}' is not an llm.c token shard: magic 12345 at byte 0, "
                                "expected 20240520")
        truncated = self.path("truncated.bin")
        with open(truncated, "wb") as f:
            f.write(struct.pack("<3i", 20240520, 1, 1000) + bytes(1012) + bytes(2 * 999))
        self.expect_train_error("truncated", [f"data.train={truncated}"],
                                f"token shard '{truncated}' is 3022 bytes but its header (byte 8) "
                                "declares 1000 tokens", "truncated or corrupt")
        big = self.path("big_ids.bin")
        tokens = [i % 1000 for i in range(2000)]
        with open(big, "wb") as f:
            f.write(struct.pack("<3i", 20240520, 1, len(tokens)) + bytes(1012))
            f.write(struct.pack(f"<{len(tokens)}H", *tokens))
        self.expect_train_error("big_ids", [f"data.train={big}"],
                                f"token shard '{big}' holds token id 256 at token 256 (byte offset "
                                "1536), outside the model's vocabulary of 256",
                                "its largest id is 999",
                                "GPT-2 token shards need model.vocab = \"gpt2\"")
        self.expect_train_error("long_seq", ["train.seq_len=65"],
                                "train.seq_len (65) exceeds the model's block size (64)")
        self.expect_train_error("no_match", [f"data.train={self.path('*.nothing')}"],
                                "matches no file")

    def test_device_and_comm_backend_errors(self):
        """train.device = "cuda" where it cannot run, and comm.backend misuse: a clear error and
        no run directory. Without a GPU (this machine) the cuda preset's binary must say that no
        device is visible; the cpu preset's that it was built without CUDA."""
        self.expect_train_error("nccl_on_cpu", ["comm.backend=nccl"],
                                'comm.backend = "nccl" needs train.device = "cuda"')
        self.expect_train_error("bad_backend", ["comm.backend=gloo"], "comm.backend", "gloo")
        smi = shutil.which("nvidia-smi")
        if smi and run(smi, "-L").returncode == 0:
            self.skipTest("a GPU is visible: scripts/gpu_check.sh runs train --device cuda")
        run_dir = self.path("cuda_without_gpu")
        args = ["train", "--config", self.config, "--set", f"run.dir={run_dir}", "--device", "cuda"]
        r = run(MESHTRAIN, *args)
        self.assertEqual(r.returncode, 1, f"exit status\n{r.out}{r.err}")
        self.assertTrue("no CUDA device is visible" in r.err or "built without CUDA" in r.err,
                        f"stderr: {r.err}")
        for crash in ("terminate called", "Segmentation", "Aborted", "unexpected error"):
            self.assertNotIn(crash, r.err)
        self.assertFalse(os.path.exists(run_dir), "a failed run left its directory behind")

    def test_generate_on_a_bad_run_directory(self):
        self.expect_error(["generate", "--run", self.path("no_such_run")],
                          f"'{self.path('no_such_run')}' is not a finished run directory")
        broken = self.path("broken_run")
        shutil.copytree(self.run_dir, broken)
        weights = os.path.join(broken, "model.safetensors")
        size = os.path.getsize(weights)
        with open(weights, "r+b") as f:
            f.truncate(size - 100)
        self.expect_error(["generate", "--run", broken], weights)
        with open(weights, "wb") as f:
            f.write(b"\x00" * 7)
        self.expect_error(["generate", "--run", broken], weights)
        shutil.copy(os.path.join(self.run_dir, "model.safetensors"), weights)
        config = os.path.join(broken, "config.toml")
        with open(config, "a") as f:
            f.write("\n[train]\nsteps = 1\n")  # a second [train]: not valid TOML
        self.expect_error(["generate", "--run", broken], f"config file {config}:")
        # Weights of another model: a different width.
        with open(config, "w") as f:
            f.write(CONFIG.format(corpus=self.corpus, run=broken)
                    .replace('preset = "gpt-tiny"', 'preset = "gpt-tiny"\nn_embd = 32'))
        self.expect_error(["generate", "--run", broken],
                          "tensor 'wte.weight' has shape [256, 64], the model expects [256, 32]")
        self.expect_error(["generate", "--run", self.run_dir, "--tokens", "many"],
                          "--tokens 'many': expected a number")

    def test_plan(self):
        r = run(MESHTRAIN, "plan", "--model", "gpt2", "--budget-flops", "1e21", check=True)
        self.assertIn("parameters: 124475904", r.out)
        self.assertIn("compute-optimal model", r.out)
        # DP > 1 shows the gradient buckets: automatic (gpt2 is large: DDP's 25 MiB) or set.
        r = run(MESHTRAIN, "plan", "--model", "gpt2", "--dp", "2", check=True)
        self.assertIn("then about 25.00 MiB each (dp.bucket_mb = 0: an eighth", r.out)
        r = run(MESHTRAIN, "plan", "--dp", "2", check=True)
        self.assertIn("then about 5.17 MiB each (dp.bucket_mb = 0: an eighth", r.out)
        r = run(MESHTRAIN, "plan", "--dp", "2", "--set", "dp.bucket_mb=4", check=True)
        self.assertIn("then about 4.00 MiB each (dp.bucket_mb), about 11 buckets", r.out)
        self.expect_error(["plan", "--bogus"], "plan: unknown argument '--bogus'")
        self.expect_error(["plan", "--budget-flops", "abc"],
                          "--budget-flops 'abc': expected a number")
        self.expect_error(["plan", "--mfu", "2"], "--mfu '2': expected a number from 0.001 to 1")
        # A head count TP does not divide: the error names the sizes that would (gpt2-xl: 25 heads).
        self.expect_error(["plan", "--model", "gpt2-xl", "--dp", "2", "--tp", "4"],
                          "the model's 25 attention heads (model.n_head) cannot be split across 4 "
                          "tensor-parallel ranks; train.tp must divide model.n_head: 1, 5, 25 would")
        self.expect_error(["plan", "--batch"], "--batch needs a value")
        self.expect_error(["plan", "--model", "gpt5"],
                          "'model.preset' = \"gpt5\" is not one of: gpt2")
        self.expect_error(["plan", "--precision", "fp8"],
                          "'train.precision' = \"fp8\" is not one of")

    def test_unknown_command(self):
        r = self.expect_error(["fly"], "unknown command 'fly'", rc=2)
        self.assertIn("usage: meshtrain", r.err)
        for cmd in ("train", "generate", "plan", "export", "import", "env"):
            r = run(MESHTRAIN, cmd, "--help", check=True)
            self.assertIn(f"usage: meshtrain {cmd}", r.out)

    def test_flag_forms(self):
        # Every command takes --flag VALUE and --flag=VALUE alike, and names itself and the
        # flag when one is wrong.
        a = run(MESHTRAIN, "plan", "--model", "gpt2", "--dp", "4", check=True).out
        b = run(MESHTRAIN, "plan", "--model=gpt2", "--dp=4", check=True).out
        self.assertEqual(a, b)
        self.assertIn("parameters: 124475904", b)
        self.expect_error(["plan", "--dp=x"], "--dp 'x': expected a number")
        self.expect_error(["generate", "--tokens"], "generate: --tokens needs a value")
        self.expect_error(["train", "--quiet=1"], "train: --quiet takes no value")
        self.expect_error(["env", "--bogus"], "env: unknown argument '--bogus'")
        self.expect_error(["export", "extra"], "export: unknown argument 'extra'")
        self.expect_error(["import", "--hf"], "import: --hf needs a value")


def main():
    global MESHTRAIN, PLOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--plot", required=True)
    args, rest = ap.parse_known_args()
    MESHTRAIN, PLOT = args.meshtrain, args.plot
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)


if __name__ == "__main__":
    main()
