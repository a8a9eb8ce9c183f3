#!/usr/bin/env python3
"""Tokenizer throughput, MB/s on one core: meshtrain's (bench_tokenizer) against the `tokenizers`
library, on the same texts in the same run, for the GPT-2, Llama 3 and Qwen2 configurations.

The tokenizer.json files are built as tests/runtime/test_tokenizer_hf.py builds them (the
published pre-tokenizer patterns, normalizer, BPE options and special tokens; vocabularies
trained on the built-in corpus). The texts are every line of the corpus plus the generated
multilingual lines of that test. `tokenizers` runs encode_batch on the whole list with one
thread (RAYON_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false); meshtrain encodes the same texts one
call each on one thread. Each side: one warm-up pass (its word cache fills), then --reps timed
passes; the median is reported, by wall time and by the process's CPU time (MB per CPU-second:
what one core does, less sensitive to other work on a shared machine), with the first (cold)
pass and the load average around it.

    /usr/bin/python3 bench/bench_tokenizer.py --bench build/cpu/bench/bench_tokenizer \\
        --corpus build/cpu/generated/default_corpus.txt [--reps 5] [--rounds 3] [--vocab 50000]
"""
import os

# One thread for `tokenizers`: set before it is imported.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "runtime"))
import test_tokenizer_hf as hf  # noqa: E402  (the builders and the corpus)
from tokenizers import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True, help="build/cpu/bench/bench_tokenizer")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything this many times")
    ap.add_argument("--vocab", type=int, default=50000)
    args = ap.parse_args()

    lines = [l for l in open(args.corpus, encoding="utf-8", errors="replace").read().split("\n")]
    texts = lines + hf.generated_texts(19, 20000)
    nbytes = sum(len(t.encode()) for t in texts)
    train_texts = hf.training_texts(lines, 5)
    configs = [("GPT-2", hf.build_gpt2(train_texts, args.vocab)),
               ("Llama 3", hf.build_llama3(train_texts, args.vocab)),
               ("Qwen2", hf.build_qwen2(train_texts, args.vocab))]
    print(f"{len(texts)} texts, {nbytes / 1e6:.2f} MB; {os.cpu_count()} CPUs; "
          f"tokenizers {hf.tokenizers.__version__}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = os.path.join(tmp, "texts.bin")
        with open(cases, "wb") as f:
            f.write(struct.pack("<I", len(texts)))
            for t in texts:
                b = t.encode()
                f.write(struct.pack("<I", len(b)))
                f.write(b)
        for rnd in range(args.rounds):
            for name, j in configs:
                path = os.path.join(tmp, "tokenizer.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(j, f, ensure_ascii=False)
                ref = Tokenizer.from_str(json.dumps(j))
                load0 = os.getloadavg()[0]
                t0 = time.perf_counter()
                enc = ref.encode_batch(texts)
                hf_first = time.perf_counter() - t0
                hf_ids = sum(len(e.ids) for e in enc)
                hf_reps, hf_cpu = [], []
                for _ in range(args.reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    ref.encode_batch(texts)
                    hf_reps.append(time.perf_counter() - t0)
                    hf_cpu.append(time.process_time() - c0)
                out = subprocess.run([args.bench, path, cases, "--reps", str(args.reps)],
                                     check=True, capture_output=True, text=True).stdout
                ours = json.loads(out)
                load1 = os.getloadavg()[0]
                if ours["ids"] != hf_ids:
                    sys.exit(f"{name}: meshtrain gave {ours['ids']} ids, tokenizers {hf_ids}")
                hf_mb = nbytes / 1e6 / statistics.median(hf_reps)
                row = dict(round=rnd + 1, config=name, vocab=ref.get_vocab_size(),
                           ours=ours["median_mb_s"], ours_first=nbytes / 1e6 / ours["first_s"],
                           ours_cpu=ours["median_cpu_mb_s"],
                           hf=hf_mb, hf_first=nbytes / 1e6 / hf_first,
                           hf_cpu=nbytes / 1e6 / statistics.median(hf_cpu), load=(load0, load1))
                rows.append(row)
                print(f"round {rnd + 1} {name:8s} vocab {row['vocab']:6d}: meshtrain "
                      f"{row['ours']:6.2f} MB/s wall, {row['ours_cpu']:6.2f} per CPU-s (first "
                      f"pass {row['ours_first']:.2f}); tokenizers {row['hf']:5.2f} wall, "
                      f"{row['hf_cpu']:5.2f} per CPU-s (first pass {row['hf_first']:.2f}); "
                      f"load {load0:.2f} -> {load1:.2f}", flush=True)
    print("\n| configuration | vocab | meshtrain MB/s (wall) | tokenizers MB/s (wall) | ratio "
          "| meshtrain MB/CPU-s | tokenizers MB/CPU-s | ratio | load (1 min) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, _ in configs:
        rs = [r for r in rows if r["config"] == name]
        med = {k: statistics.median(r[k] for r in rs) for k in ("ours", "hf", "ours_cpu", "hf_cpu")}
        loads = [l for r in rs for l in r["load"]]
        print(f"| {name} | {rs[0]['vocab']} | {med['ours']:.2f} | {med['hf']:.2f} | "
              f"{med['ours'] / med['hf']:.1f}x | {med['ours_cpu']:.2f} | {med['hf_cpu']:.2f} | "
              f"{med['ours_cpu'] / med['hf_cpu']:.1f}x | {min(loads):.2f}-{max(loads):.2f} |")


if __name__ == "__main__":
    main()
