#!/usr/bin/python3
"""Fits the byte-level BPE tokenizer of the main job to the built-in corpus (Debian's fortunes).

Run once; its output, launch/corpus_tokenizer.json, is committed, so that the main job neither
needs the `tokenizers` package nor spends its three minutes fitting. Why `tokenizers` rather than
meshtrain itself: meshtrain reads and applies tokenizer.json files (runtime/tokenizer.hpp) but
has no BPE trainer, and a file written by the reference library is what users bring anyway.

The tokenizer is Llama 3's kind: its split pattern, byte-level BPE with ignore_merges,
<|begin_of_text|> put before the text by the post-processor (bos) and <|end_of_text|> (eos).

  scripts/fit_corpus_tokenizer.py CORPUS [--vocab 2048] [--out launch/corpus_tokenizer.json]
"""
import argparse
import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--out", default="launch/corpus_tokenizer.json")
    args = ap.parse_args()
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    with open(args.corpus, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # The corpus's documents: fortunes, separated by blank lines.
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(args.out)
    ids = tok.encode(text[:200000], add_special_tokens=False).ids
    print(f"wrote {args.out}: vocabulary {tok.get_vocab_size()}, "
          f"{200000 / len(ids):.2f} bytes per token on the corpus's first 200 kB")


if __name__ == "__main__":
    main()
