"""Every command in every README runs, as a user would run it.

Extracts the command lines of the fenced ```sh blocks of every README.md in the repository and
of docs/*.md (a line ending in a backslash continues; a here-document is part of its command),
and runs each file's commands in order, in a sandbox directory of its own, so that later
commands find what earlier ones made: `$B` and the other variables a README sets carry over,
its ```toml block is job.toml, and build/, launch/, scripts/, deploy/, tests/ are the
repository's (build/cpu being the build under test). Each must exit 0. Under it:
  - mpirun gets --oversubscribe (this machine has fewer cores than the examples' ranks) and
    --allow-run-as-root when run as root; MESHTRAIN_THREADS=1 keeps oversubscribed ranks apart;
  - a command that would run for minutes as written is shortened by SHORTEN: overrides appended
    to it that keep its meaning (fewer steps, fewer sampled tokens);
  - files a command names that a user would bring (a text corpus, llm.c token shards, the run
    directory the main job makes) are made by STAND_INS before the first command that names them;
  - a command that cannot run here (docker, kubectl, sbatch on a real cluster, GPUs, the whole
    test suite, builds of other presets) is listed in NOT_RUN with the reason and the test that
    covers it instead.
The test fails on a command that exits non-zero, on a command that is neither run nor listed
(so a new README command cannot go untested), and on a NOT_RUN entry that matches no command (a
stale one). Each command's time is printed: 9 minutes in all on the shared 2-core machine at
load 14 before train.seq_len=64 joined the shortening (mpirun -np 4 of gpt-small: 40-120 s
each there), a few minutes on a quiet one.

To add a README command: nothing, if it runs here in seconds as written. If it runs for minutes,
add a SHORTEN rule (a regular expression that matches it, and the arguments appended); if it
names a file a user brings, a STAND_INS entry (the name, and a function that makes it); if it
cannot run here, a NOT_RUN entry (an anchored regular expression matching only it, why, and the
test that covers it).
"""
import argparse
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

# ---- what is not run, and why ----------------------------------------------------------------
# (regular expression matched against the whole command without its trailing comment, reason,
# the test that covers it instead)
NOT_RUN = [
    (r"scripts/main_job\.sh", "installs packages, builds and trains 270 steps (minutes)",
     "CI: .ci/run runs it shortened in a fresh Debian root (scripts/ci_fresh_root.sh main); its "
     "run directory runs/main is a stand-in here"),
    (r"scripts/test\.sh", "the whole test suite, this test included", "CI: .ci/run (tests)"),
    (r"ctest --preset cpu", "the whole test suite, this test included", "CI: .ci/run (tests)"),
    (r"scripts/setup\.sh", "configures and builds the cpu preset: the build this test runs on",
     "every ctest run (CI: .ci/run)"),
    (r"scripts/setup\.sh cpu-asan", "a full AddressSanitizer build (20+ min on 2 cores)",
     "run by hand: scripts/test.sh cpu-asan"),
    (r"scripts/setup\.sh cuda", "the CUDA build (nvcc, cuDNN, NCCL; 10+ min)",
     "CI: .ci/run (cuda: compile and link)"),
    (r"scripts/setup\.sh fuzz", "the clang + ASan fuzz build", "CI: scripts/ci_fuzz.sh"),
    (r"(FUZZ_SECONDS=\d+ FUZZ_TARGETS=\w+ )?scripts/ci_fuzz\.sh", "builds the fuzz preset and fuzzes for minutes",
     "CI: .ci/run (fuzz); fuzz_corpus_* replay the corpora"),
    (r"cmake --preset fuzz && cmake --build --preset fuzz", "the clang + ASan fuzz build",
     "CI: scripts/ci_fuzz.sh"),
    (r"mkdir -p build/fuzz/corpus/safetensors", "a step of fuzzing by hand (the fuzz preset)",
     "CI: scripts/ci_fuzz.sh"),
    (r"build/fuzz/tests/fuzz/fuzz_safetensors .*", "needs the fuzz preset's build",
     "CI: scripts/ci_fuzz.sh; fuzz_corpus_safetensors"),
    (r"mpirun -np \d+ \$B train --device cuda.*", "needs GPUs (one per rank)",
     "compile: the cuda preset (CI); run: bench/gpu/README.md on a GPU machine"),
    (r"scripts/fetch_gpu_deps\.sh", "downloads the GPU image's packages for the device machine",
     "bench/gpu/README.md (scripts/gpu_check.sh on the GPU machine)"),
    (r"tests/netns/netns\.sh (up|hostfile|exec|shape|down)\b.*",
     "network namespaces as root, under a machine-wide lock, with mpirun across them",
     "netns_multinode (tests/netns/test_multinode.py runs these steps)"),
    (r"docker (build|run) .*", "no Docker engine here", "deploy_dockerfile (hadolint and structure)"),
    (r"sbatch .*deploy/slurm/.*", "needs a Slurm cluster", "deploy_slurm (a real Slurm on namespace nodes)"),
    (r"kubectl .*", "needs a Kubernetes cluster with the MPI Operator",
     "deploy_kubernetes (the MPIJob against the operator's schema)"),
]

# ---- commands shortened (first match wins): appended arguments that keep the meaning --------
_QUICK = "--set train.steps=2 --set train.seq_len=64 --set sample.tokens=4 --set eval.batches=1"
SHORTEN = [
    (r".*--help.*", ""),
    # The checkpoint walk-through: a 200-step run (gpt-tiny: a second) so that step_00000200
    # exists for the commands after it.
    (r".*train --set checkpoint\.every=100 --set checkpoint\.keep=3",
     "--set model.preset=gpt-tiny --set train.seq_len=64 --set train.steps=200 --set sample.tokens=4"),
    (r".*train --resume latest", ""),  # continues where the one before ended
    (r".*--resume runs/latest/checkpoints/step_00000200 --set train.steps=5000", "--set train.steps=210"),
    (r"mpirun .*--resume latest --set train\.batch_size=4", "--set train.steps=215"),
    # The supervised job: a run directory of its own (runs/latest holds another model by then).
    (r"launch/meshtrain-supervise .*", f"--set run.dir=runs/supervised {_QUICK}"),
    (r".*\$B train .*--set model\.preset=gpt2\b.*",
     "--set train.steps=1 --set model.n_layer=1 --set train.seq_len=64 --set train.batch_size=1 "
     "--set sample.tokens=4 --set eval.batches=1"),
    (r".*train --set model\.preset=gpt-tiny --set train\.seq_len=64 --set train\.steps=200", "--set train.steps=20"),
    (r".*\$B train\b.*", _QUICK),
    (r".*\$B generate .*", "--tokens 20"),
]

# Commands that need what this machine may lack: (regular expression, check, what is missing).
# The command is reported skipped, naming what it needs, when the check fails.
def _python_has(*mods):
    return lambda: subprocess.run(["/usr/bin/python3", "-c", "import " + ", ".join(mods)],
                                  capture_output=True).returncode == 0


NEEDS = [
    (r"/usr/bin/python3 deploy/kubernetes/validate\.py .*", _python_has("yaml", "jsonschema"),
     "python3-yaml and python3-jsonschema (deploy_kubernetes skips likewise)"),
]


# ---- stand-ins: files a user brings --------------------------------------------------------
def _corpus(sandbox, root):
    # Real English text: the repository's own documentation, about 100 KB.
    text = ""
    for p in sorted(glob.glob(os.path.join(root, "**", "*.md"), recursive=True)):
        if "/build" not in p and "/.deps" not in p:
            text += open(p, encoding="utf-8").read()
    open(os.path.join(sandbox, "corpus.txt"), "w", encoding="utf-8").write(text[:200000])


def _gpt2_shard(path, n, seed):
    # llm.c's GPT-2 format: 256 int32 of header (magic 20240520, version 1, token count), uint16s.
    import random
    rng = random.Random(seed)
    header = struct.pack("<256i", 20240520, 1, n, *([0] * 253))
    tokens = struct.pack(f"<{n}H", *(rng.randrange(50257) for _ in range(n)))
    open(path, "wb").write(header + tokens)


def _fineweb(sandbox, root):
    _gpt2_shard(os.path.join(sandbox, "fineweb_train_000001.bin"), 20000, 1)
    _gpt2_shard(os.path.join(sandbox, "fineweb_train_000002.bin"), 20000, 2)
    _gpt2_shard(os.path.join(sandbox, "fineweb_val_000000.bin"), 5000, 3)


def _main_run(sandbox, root, env):
    # What scripts/main_job.sh leaves: a finished run in runs/main (shortened), its model and
    # tokenizer.
    cmd = [os.path.join(sandbox, "build/cpu/launch/meshtrain"), "train", "--set", "run.dir=runs/main",
           "--set", "model.preset=llama-small", "--set", "data.tokenizer=launch/corpus_tokenizer.json",
           *_QUICK.split()]
    subprocess.run(cmd, cwd=sandbox, env=env, check=True, capture_output=True, timeout=300)


def _tokenizer(sandbox, root):
    # A user's tokenizer.json: the main job's BPE tokenizer, fitted to the built-in corpus.
    shutil.copy(os.path.join(root, "launch", "corpus_tokenizer.json"), os.path.join(sandbox, "tokenizer.json"))


def _text_files(sandbox, root):
    # corpus/*.txt and a.txt: the repository's documentation as text.
    _corpus(sandbox, root)
    text = open(os.path.join(sandbox, "corpus.txt"), encoding="utf-8").read()
    os.makedirs(os.path.join(sandbox, "corpus"), exist_ok=True)
    half = len(text) // 2
    open(os.path.join(sandbox, "corpus", "a.txt"), "w", encoding="utf-8").write(text[:half])
    open(os.path.join(sandbox, "corpus", "b.txt"), "w", encoding="utf-8").write(text[half:])
    shutil.copy(os.path.join(sandbox, "corpus.txt"), os.path.join(sandbox, "a.txt"))


def _transformers(code, *args):
    # A small random-weight model saved by transformers (save_pretrained), as a user downloads one.
    subprocess.run(["/usr/bin/python3", "-c", code, *args], check=True, capture_output=True, timeout=300)


def _hf_llama(sandbox, root):
    # ./Llama-3.2-1B: a LlamaForCausalLM of Llama 3.2's kind (grouped-query attention, tied
    # embeddings) at a size that runs here, with the main job's tokenizer.
    _transformers("""
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
c = LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
LlamaForCausalLM(c).save_pretrained(sys.argv[1], safe_serialization=True)
shutil.copy(sys.argv[2], sys.argv[1] + "/tokenizer.json")
""", os.path.join(sandbox, "Llama-3.2-1B"), os.path.join(root, "launch", "corpus_tokenizer.json"))


def _hf_gpt2(sandbox, root):
    # hf_gpt2: a GPT2LMHeadModel with the byte vocabulary at a size that runs here.
    _transformers("""
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
c = GPT2Config(vocab_size=256, n_positions=256, n_embd=64, n_layer=2, n_head=4)
GPT2LMHeadModel(c).save_pretrained(sys.argv[1], safe_serialization=True)
""", os.path.join(sandbox, "hf_gpt2"))


# name a command mentions -> the function that makes it (once, before the first such command)
STAND_INS = {
    "corpus.txt": _corpus,
    "fineweb_train_": _fineweb,
    "runs/main": _main_run,
    "tokenizer.json": _tokenizer,
    "corpus/": _text_files,
    "data.train=a.txt": _text_files,
    "./Llama-3.2-1B": _hf_llama,
    "hf_gpt2": _hf_gpt2,
}


# ---- extraction ----------------------------------------------------------------------------
def readmes(root):
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "build" and d != "runs")
        if "README.md" in files:
            out.append(os.path.join(dirpath, "README.md"))
    out += sorted(glob.glob(os.path.join(root, "docs", "*.md")))
    return sorted(set(out), key=lambda p: (os.path.dirname(p) != root, p))


def commands(path):
    """(line number, command, toml blocks) of a markdown file's ```sh blocks."""
    lines = open(path, encoding="utf-8").read().split("\n")
    cmds, tomls = [], []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if fence in ("```sh", "```toml"):
            j = i + 1
            block = []
            while j < len(lines) and lines[j].strip() != "```":
                block.append((j + 1, lines[j]))
                j += 1
            if fence == "```toml":
                tomls.append("\n".join(t for _, t in block) + "\n")
            else:
                k = 0
                while k < len(block):
                    lineno, text = block[k]
                    if not text.strip() or text.lstrip().startswith("#"):
                        k += 1
                        continue
                    cmd = text
                    while cmd.endswith("\\") and k + 1 < len(block):
                        k += 1
                        cmd = cmd[:-1].rstrip() + " " + block[k][1].strip()
                    heredoc = re.search(r"<<-?\s*'?(\w+)'?", cmd)
                    if heredoc:
                        while k + 1 < len(block):
                            k += 1
                            cmd += "\n" + block[k][1]
                            if block[k][1].strip() == heredoc.group(1):
                                break
                    cmds.append((lineno, cmd))
                    k += 1
            i = j
        i += 1
    return cmds, tomls


def strip_comment(cmd):
    """The command without its trailing `# comment` (first line of a here-document)."""
    first, sep, rest = cmd.partition("\n")
    out, quote = "", None
    for n, c in enumerate(first):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (n == 0 or first[n - 1].isspace()):
            break
        out += c
    return out.rstrip() + sep + rest


# ---- running -------------------------------------------------------------------------------
def make_sandbox(root, build, tmp, name):
    s = os.path.join(tmp, name)
    os.makedirs(os.path.join(s, "build"))
    os.symlink(build, os.path.join(s, "build", "cpu"))
    for d in ("launch", "scripts", "deploy", "tests", "bench", "docs"):
        os.symlink(os.path.join(root, d), os.path.join(s, d))
    return s


def for_bash(cmd):
    """The command as run here: mpirun oversubscribed (and allowed as root), shortened."""
    flags = "--oversubscribe" + (" --allow-run-as-root" if os.geteuid() == 0 else "")
    body = strip_comment(cmd)
    if "\n" not in body:
        for pattern, extra in SHORTEN:
            if re.fullmatch(pattern, body):
                body = f"{body} {extra}".rstrip()
                break
    return re.sub(r"(^|\s)mpirun(?=\s)", rf"\1mpirun {flags}", body)


def is_assignment(cmd):
    return re.fullmatch(r"(export\s+)?[A-Za-z_]\w*=\S*(\s+[A-Za-z_]\w*=\S*)*", strip_comment(cmd)) is not None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="the repository")
    ap.add_argument("--build", required=True, help="the cpu build directory (holds launch/meshtrain)")
    ap.add_argument("--only", default="", help="only README files whose path contains this")
    a = ap.parse_args()
    root, build = os.path.abspath(a.root), os.path.abspath(a.build)
    env = dict(os.environ, MESHTRAIN_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_mpi_yield_when_idle="1")
    used = set()
    problems, ran, listed, skipped = [], 0, 0, 0
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for path in readmes(root):
            rel = os.path.relpath(path, root)
            if a.only and a.only not in rel:
                continue
            cmds, tomls = commands(path)
            if not cmds:
                continue
            sandbox = make_sandbox(root, build, tmp, rel.replace("/", "_"))
            if tomls:
                open(os.path.join(sandbox, "job.toml"), "w").write(tomls[0])
            made, prelude = set(), []
            for lineno, cmd in cmds:
                where = f"{rel}:{lineno}"
                bare = strip_comment(cmd)
                hit = next((n for n, (p, _, _) in enumerate(NOT_RUN) if re.fullmatch(p, bare)), None)
                if hit is not None:
                    used.add(hit)
                    listed += 1
                    print(f"not run  {where}: {bare.splitlines()[0]}\n         ({NOT_RUN[hit][1]}; "
                          f"covered by {NOT_RUN[hit][2]})")
                    continue
                need = next((n for n in NEEDS if re.fullmatch(n[0], bare)), None)
                if need is not None and not need[1]():
                    skipped += 1
                    print(f"skipped  {where}: {bare} (needs {need[2]})")
                    continue
                if is_assignment(cmd):
                    prelude.append(bare)
                # What the command names, and what the job.toml it names names.
                mentions = cmd + (tomls[0] if tomls and "job.toml" in cmd else "")
                for key, make in STAND_INS.items():
                    if key in mentions and key not in made:
                        made.add(key)
                        if make is _main_run:
                            make(sandbox, root, env)
                        else:
                            make(sandbox, root)
                script = "set -o pipefail\n" + "\n".join(prelude) + "\n" + for_bash(cmd) + "\n"
                t0 = time.time()
                try:
                    p = subprocess.run(["bash", "-c", script], cwd=sandbox, env=env, capture_output=True,
                                       timeout=600)
                    rc, out = p.returncode, (p.stdout + p.stderr).decode(errors="replace")
                except subprocess.TimeoutExpired as e:
                    rc, out = "timeout (600 s)", (e.stdout or b"").decode(errors="replace")
                ran += 1
                took = time.time() - t0
                shown = for_bash(cmd).splitlines()[0]
                if rc != 0:
                    problems.append(f"{where}: `{shown}` exited {rc}:\n{out[-3000:]}")
                    print(f"FAILED   {where}: {shown} ({took:.1f} s, exit {rc})")
                else:
                    print(f"ok       {where}: {shown} ({took:.1f} s)")
    if not a.only:
        for n, (pattern, _, _) in enumerate(NOT_RUN):
            if n not in used:
                problems.append(f"NOT_RUN entry '{pattern}' matches no README command: remove it")
    print(f"{ran} run, {listed} listed as not run, {skipped} skipped for a missing tool, "
          f"{time.time() - t_all:.0f} s")
    if problems:
        sys.exit("FAIL:\n" + "\n\n".join(problems))


if __name__ == "__main__":
    main()
