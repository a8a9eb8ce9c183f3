#!/usr/bin/python3
"""The Llama family and tokenizers through the meshtrain CLI, as a user runs them.

  1. `meshtrain tokenize` writes train/val shards (uint16 for a 2,048-token vocabulary, uint32
     for a 70,000-token one) whose ids are the `tokenizers` library's for the same documents,
     and refuses a missing file without creating the output directory.
  2. `meshtrain import --hf` of a random LlamaForCausalLM (bf16 shards) with a tokenizer.json
     beside it: the run directory gets the weights, hf_config.json, config.toml and the
     tokenizer; `generate --prompt` streams text; `--prompt-ids ... --ids` gives the same ids as
     transformers' greedy generate(); `export --hf` gives back what from_pretrained reads, with
     the tokenizer; bad directories are refused with nothing written.
  3. `train` of llama-tiny with data.tokenizer on a text file: the run keeps the tokenizer and
     `generate` decodes; text under model.vocab = gpt2 without a tokenizer is refused naming the
     file (alone and mixed with token shards), with no run directory left.
  4. Under mpirun (fp32): 1 rank, DP 2, TP 2 and DP 2 x TP 2 train the same llama-tiny to the
     same losses (float32 rounding).
  5. Under mpirun (fp32), KV heads replicated over TP ranks (check_kv_replication): TP 4 with
     2 KV heads, TP 2 and DP 2 x TP 2 with one, Qwen2 at TP 4: one rank's losses and final
     weights; generate at TP 4 = one process; checkpoints resharded TP 4 -> 2, 4 -> 1, 1 -> 4;
     sequence parallelism (tp.sequence_parallel) at TP 4 and, for Qwen2, DP 2 x TP 2.

  test_cli_llama.py --meshtrain PATH/meshtrain [--mpiexec "mpirun --oversubscribe -np"]
"""
import argparse
import json
import os
import shlex
import struct
import subprocess
import sys
import tempfile

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
FAIL = []
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
TEXT = "\n\n".join(
    f"Fortune {i}: the quick brown fox jumps over the lazy dog {i % 7} times; "
    f"a stitch in time saves nine, {'and ' * (i % 3)}don't count your chickens."
    for i in range(400)) + "\n"


def check(cond, what):
    if cond:
        print("ok:", what)
    else:
        print("FAIL:", what)
        FAIL.append(what)


def run(cmd, timeout=600, env=None):
    e = dict(os.environ, MESHTRAIN_THREADS="1", **(env or {}))
    # errors="replace": a byte-vocabulary model's samples need not be UTF-8.
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                          env=e)


def make_tokenizer(path, vocab):
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    tr = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT.split("\n\n"), trainer=tr)
    if vocab > 65536:  # a vocabulary wider than uint16: pad with unused added tokens
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(vocab - tok.get_vocab_size())])
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(path)
    return tok


def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    magic, version, n = struct.unpack("<3i", data[:12])
    width = {20240520: 2, 20240801: 4}[magic]
    fmt = "<%d%s" % (n, "H" if width == 2 else "I")
    return magic, version, list(struct.unpack(fmt, data[1024:1024 + n * width]))


def check_tokenize(mt, tmp):
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w") as f:
        f.write(TEXT)
    for vocab, magic in ((2048, 20240520), (70000, 20240801)):
        tj = os.path.join(tmp, f"tok{vocab}.json")
        tok = make_tokenizer(tj, vocab)
        out = os.path.join(tmp, f"shards{vocab}")
        r = run([mt, "tokenize", "--tokenizer", tj, corpus, "--out", out, "--val-fraction",
                 "0.1", "--threads", "2"])
        check(r.returncode == 0 and "tokenized" in r.stdout, f"tokenize {vocab}: {r.stderr[-300:]}")
        if r.returncode:
            continue
        m1, _, train = read_shard(os.path.join(out, "train_000000.bin"))
        m2, _, val = read_shard(os.path.join(out, "val_000000.bin"))
        want = []
        for doc in [d + "\n\n" for d in TEXT.split("\n\n")[:-1]] + [TEXT.split("\n\n")[-1]]:
            want += [0] + tok.encode(doc, add_special_tokens=False).ids
        check(m1 == magic and m2 == magic, f"tokenize {vocab}: shard format magic {m1}")
        check(train + val == want, f"tokenize {vocab}: ids equal `tokenizers`' "
              f"({len(train)} + {len(val)} tokens)")
        check(val and val[0] == 0 and 0.05 < len(val) / len(want) < 0.15,
              f"tokenize {vocab}: validation shard starts a document, about 10%")
    r = run([mt, "tokenize", "--tokenizer", os.path.join(tmp, "tok2048.json"),
             os.path.join(tmp, "missing.txt"), "--out", os.path.join(tmp, "never")])
    check(r.returncode != 0 and "missing.txt" in r.stderr and not os.path.exists(
        os.path.join(tmp, "never")), f"tokenize refuses a missing file: {r.stderr.strip()}")


def check_hf(mt, tmp):
    hf = os.path.join(tmp, "hf")
    torch.manual_seed(3)
    # The model's vocabulary: the tokenizer's (the small text gives fewer than 2,048 tokens).
    vocab = Tokenizer.from_file(os.path.join(tmp, "tok2048.json")).get_vocab_size()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rope_theta=500000.0, bos_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.save_pretrained(hf, safe_serialization=True, max_shard_size="200KB")
    import shutil
    shutil.copy(os.path.join(tmp, "tok2048.json"), os.path.join(hf, "tokenizer.json"))
    with open(os.path.join(hf, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, f)
    run_dir = os.path.join(tmp, "imported")
    r = run([mt, "import", "--hf", hf, "--out", run_dir])
    check(r.returncode == 0, f"import --hf Llama (bf16 shards): {r.stdout.strip()} {r.stderr[-400:]}")
    for f in ("model.safetensors", "hf_config.json", "config.toml", "tokenizer.json",
              "tokenizer_config.json"):
        check(os.path.exists(os.path.join(run_dir, f)), f"import wrote {f}")
    r = run([mt, "generate", "--run", run_dir, "--prompt", "The quick brown", "--tokens", "8"])
    check(r.returncode == 0 and r.stdout.startswith("The quick brown"),
          f"generate decodes text: {r.stdout.strip()!r} {r.stderr[-300:]}")
    prompt = [0, 5, 77, 300]
    r = run([mt, "generate", "--run", run_dir, "--prompt-ids", ",".join(map(str, prompt)),
             "--ids", "--tokens", "10", "--temperature", "0"])
    ours = [int(x) for x in r.stdout.split()] if r.returncode == 0 else None
    ref = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32,
                                           attn_implementation="eager")
    with torch.no_grad():
        gen = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                           eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
    # meshtrain stops at the tokenizer's eos (1); compare up to it.
    if 1 in gen:
        gen = gen[:gen.index(1) + 1]
    check(ours == gen, f"generate --prompt-ids --ids equals transformers' greedy: {ours} vs {gen}")
    exported = os.path.join(tmp, "exported")
    r = run([mt, "export", "--hf", exported, "--run", run_dir])
    check(r.returncode == 0 and os.path.exists(os.path.join(exported, "tokenizer.json")),
          f"export --hf with the tokenizer: {r.stdout.strip()} {r.stderr[-300:]}")
    if r.returncode == 0:
        back = LlamaForCausalLM.from_pretrained(exported, torch_dtype=torch.float32).state_dict()
        same = all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
        check(same, "export -> from_pretrained: the imported tensors exactly")
    bad = os.path.join(tmp, "bad-hf")
    shutil.copytree(hf, bad)
    with open(os.path.join(bad, "config.json")) as f:
        c = json.load(f)
    c["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(c, f)
    out = os.path.join(tmp, "bad-import")
    r = run([mt, "import", "--hf", bad, "--out", out])
    check(r.returncode != 0 and "rope_scaling" in r.stderr and "config.json" in r.stderr and
          not os.path.exists(out), f"import refuses rope_scaling dynamic: {r.stderr.strip()}")


def check_train(mt, tmp):
    corpus = os.path.join(tmp, "corpus.txt")
    tj = os.path.join(tmp, "tok2048.json")
    rd = os.path.join(tmp, "trained")
    r = run([mt, "train", "--quiet", "--set", "model.preset=llama-tiny", "--set",
             f"data.tokenizer={tj}", "--set", f"data.train={corpus}", "--set", "train.steps=6",
             "--set", "train.seq_len=32", "--set", "train.batch_size=2", "--set",
             f"run.dir={rd}", "--set", "sample.tokens=0"])
    check(r.returncode == 0 and os.path.exists(os.path.join(rd, "tokenizer.json")),
          f"train with data.tokenizer keeps the tokenizer: {r.stderr[-300:]}")
    r = run([mt, "generate", "--run", rd, "--prompt", "the quick", "--tokens", "5"])
    check(r.returncode == 0 and r.stdout.startswith("the quick"),
          f"generate after data.tokenizer: {r.stdout.strip()!r} {r.stderr[-200:]}")
    for files in ([corpus], [os.path.join(tmp, "shards2048", "train_000000.bin"), corpus]):
        rd2 = os.path.join(tmp, "refused")
        r = run([mt, "train", "--quiet", "--set", "model.vocab=gpt2", "--set",
                 "data.train=" + json.dumps(files), "--set", f"run.dir={rd2}", "--set",
                 "train.steps=1", "--set", "model.preset=gpt-tiny", "--set", "train.seq_len=32"])
        check(r.returncode != 0 and "corpus.txt" in r.stderr and "data.tokenizer" in r.stderr
              and not os.path.exists(rd2),
              f"text with model.vocab = gpt2 and no tokenizer refused ({len(files)} files): "
              f"{r.stderr.strip()[-300:]}")


def check_layouts(mt, tmp, mpiexec):
    losses = {}
    for ranks, tp in ((1, 1), (2, 1), (2, 2), (4, 2)):
        rd = os.path.join(tmp, f"layout-{ranks}-{tp}")
        dp = ranks // tp
        cmd = ([] if ranks == 1 else shlex.split(mpiexec) + [str(ranks)]) + [
            mt, "train", "--quiet", "--tp", str(tp), "--set", "model.preset=llama-tiny",
            "--set", "train.precision=fp32", "--set", "train.steps=4", "--set",
            "train.seq_len=32", "--set", f"train.batch_size={4 // dp}", "--set",
            f"run.dir={rd}", "--set", "sample.tokens=0", "--set", "eval.every=0"]
        r = run(cmd, timeout=900)
        if r.returncode != 0:
            check(False, f"train DP {dp} x TP {tp}: {r.stderr[-400:]}")
            continue
        with open(os.path.join(rd, "metrics.jsonl")) as f:
            losses[(dp, tp)] = [json.loads(l)["loss"] for l in f if '"loss"' in l]
    base = losses.get((1, 1))
    for k, v in losses.items():
        if k == (1, 1) or base is None:
            continue
        err = max(abs(a - b) / abs(b) for a, b in zip(v, base))
        check(len(v) == len(base) and err < 2e-6,
              f"llama-tiny fp32 DP {k[0]} x TP {k[1]} losses equal one rank's (worst {err:.1e})")


def read_weights(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    return {k: torch.frombuffer(bytearray(data[v["data_offsets"][0]:v["data_offsets"][1]]),
                                dtype=torch.float32).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"}


def check_kv_replication(mt, tmp, mpiexec):
    """Fewer KV heads than TP ranks (each KV head held by TP / n_kv_head ranks): in fp32, TP 4
    with llama-tiny's 2 KV heads, TP 2 and DP 2 x TP 2 with one KV head, and Qwen2 (k/v biases)
    at TP 4 train for 10 steps to one rank's losses and final weights; the TP 4 job's sample is
    written and `generate` split 4 ways gives one process's text; its step-5 checkpoint resumes at
    TP 2 and TP 1, and one rank's at TP 4, to the same end; with sequence parallelism, TP 4 and
    Qwen2 at DP 2 x TP 2 train to one rank's losses and weights too."""
    steps = 10

    def train(ranks, tp, name, extra=(), resume=None):
        rd = os.path.join(tmp, "kvrep-" + name)
        cmd = ([] if ranks == 1 else shlex.split(mpiexec) + [str(ranks)]) + [
            mt, "train", *(() if name == "tp4" else ("--quiet",)), "--tp", str(tp),
            "--set", "model.preset=llama-tiny",
            "--set", "train.precision=fp32", "--set", f"train.steps={steps}", "--set",
            "train.seq_len=32", "--set", f"train.batch_size={4 * tp // ranks}", "--set",
            "train.threads=1", "--set", f"run.dir={rd}", "--set", "eval.every=0",
            "--set", "checkpoint.every=5", "--set", "sample.tokens=16", *extra]
        if resume:
            cmd += ["--resume", resume]
        r = run(cmd, timeout=600)
        if r.returncode != 0:
            check(False, f"train {name}: {r.stderr[-400:]}")
            return None
        with open(os.path.join(rd, "metrics.jsonl")) as f:
            loss = [json.loads(l)["loss"] for l in f if '"loss"' in l]
        return rd, loss, r.stdout

    def same(name, got, want, first=0):
        if got is None or want is None:
            return
        gl, wl = got[1], want[1][first:]
        err = max((abs(a - b) / abs(b) for a, b in zip(gl, wl)), default=1.0)
        check(len(gl) == len(wl) and err < 2e-6,
              f"{name}: losses equal one rank's (worst {err:.1e}, {len(gl)} of {len(wl)} steps)")
        wg = read_weights(os.path.join(got[0], "model.safetensors"))
        ww = read_weights(os.path.join(want[0], "model.safetensors"))
        worst = max((float((wg[k] - ww[k]).abs().max()) for k in ww if k in wg), default=1.0)
        check(sorted(wg) == sorted(ww) and worst < 1e-4,
              f"{name}: final weights equal one rank's (worst {worst:.1e})")

    kv1 = ("--set", "model.n_kv_head=1")
    qwen = ("--set", "model.arch=qwen2")  # q/k/v biases
    one = train(1, 1, "one")
    tp4 = train(4, 4, "tp4")
    same("TP 4, 2 KV heads", tp4, one)
    if tp4 is not None:
        check("---- sample at step" in tp4[2], f"TP 4 writes its sample: {tp4[2][-300:]!r}")
        # KV-cached generation split 4 ways (a KV head on two ranks): one process's text.
        gen = ["generate", "--run", tp4[0], "--tokens", "40", "--prompt", "Q: ", "--seed", "3"]
        g1 = run([mt] + gen)
        g4 = run(shlex.split(mpiexec) + ["4", mt] + gen)
        check(g1.returncode == 0 and g4.returncode == 0 and g1.stdout == g4.stdout
              and len(g1.stdout) >= 40,
              f"generate under mpirun -np 4 equals one process: {g1.stdout!r} {g4.stdout!r} "
              f"{g4.stderr[-300:]}")
        ck = os.path.join(tp4[0], "checkpoints", "step_00000005")
        # Each run's own global batch (4 rows): TP 2 is DP 1 on 2 ranks, TP 1 one rank.
        same("TP 4 -> TP 2 resume", train(2, 2, "tp4to2", resume=ck), tp4, first=5)
        same("TP 4 -> TP 1 resume", train(1, 1, "tp4to1", resume=ck), tp4, first=5)
    if one is not None:
        ck = os.path.join(one[0], "checkpoints", "step_00000005")
        same("TP 1 -> TP 4 resume", train(4, 4, "tp1to4", resume=ck), one, first=5)
    one_kv1 = train(1, 1, "one-kv1", kv1)
    same("TP 2, 1 KV head", train(2, 2, "tp2-kv1", kv1), one_kv1)
    same("DP 2 x TP 2, 1 KV head", train(4, 2, "dp2tp2-kv1", kv1), one_kv1)
    one_qwen = train(1, 1, "one-qwen", qwen)
    same("Qwen2 TP 4, 2 KV heads", train(4, 4, "tp4-qwen", qwen), one_qwen)
    # Sequence parallelism: the token shards (a quarter of a sequence at TP 4, the KV heads
    # replicated; half the batch at DP 2 x TP 2, with Qwen2's q/k/v biases) give the same run.
    sp = ("--set", "tp.sequence_parallel=true")
    same("TP 4, 2 KV heads, sequence parallel", train(4, 4, "tp4-sp", sp), one)
    same("Qwen2 DP 2 x TP 2, sequence parallel", train(4, 2, "dp2tp2-qwen-sp", (*qwen, *sp)),
         one_qwen)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshtrain", required=True)
    ap.add_argument("--mpiexec", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        check_tokenize(args.meshtrain, tmp)
        check_hf(args.meshtrain, tmp)
        check_train(args.meshtrain, tmp)
        if args.mpiexec:
            check_layouts(args.meshtrain, tmp, args.mpiexec)
            check_kv_replication(args.meshtrain, tmp, args.mpiexec)
    if FAIL:
        print(f"{len(FAIL)} failures")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
