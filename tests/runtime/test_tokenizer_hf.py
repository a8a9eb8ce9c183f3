#!/usr/bin/env python3
"""meshtrain's tokenizer (runtime/tokenizer.hpp) against the `tokenizers` library (PyPI).

Real GPT-2, Llama 3 and Qwen2 tokenizer.json files cannot be downloaded here, so this script
builds their like with `tokenizers` itself: the same normalizer, pre-tokenizer (the published
split patterns), BPE options, decoder, post-processor and added/special tokens as those models'
files, with vocabularies trained (BpeTrainer) on the corpus, from a few hundred tokens to about
50,000. Then every text of a large mixed corpus (each line and each paragraph of the built-in
corpus, Debian's fortunes, plus generated lines of many scripts, emoji sequences, combining
marks, whitespace runs, digits, contractions, special tokens inside text and odd characters) is
encoded by both, with and without the special tokens, and must give identical ids; the ids are
decoded by both (with and without skip_special_tokens, and by the streaming decoder) and must
give identical text, as must random id sequences (partial UTF-8 sequences: U+FFFD).

Run by ctest as
    /usr/bin/python3 test_tokenizer_hf.py --runner build/.../tokenizer_runner --corpus FILE
Exits non-zero on any difference, printing the configuration, the text and both results.
Without the `tokenizers` package it fails (it never passes without having compared).
"""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata

try:
    import tokenizers
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, processors, trainers)
except ImportError as e:  # a reference test that cannot run must fail, not pass
    sys.exit(f"test_tokenizer_hf.py: the `tokenizers` package is missing ({e}); "
             "scripts/setup.sh installs it (with transformers) into /usr/bin/python3")

# The split patterns of the published tokenizer.json files.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def llama3_specials():
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(4)]
    names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
              "<|eot_id|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    assert len(names) == 256
    return names


QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                  "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                  "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                  "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                  "<|repo_name|>", "<|file_sep|>"]


# ---- the corpus --------------------------------------------------------------------------------

def corpus_texts(path):
    """Every line of the built-in corpus, and every eighth paragraph (fortune) whole."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.split("\n")
    paragraphs = [p for p in text.split("\n\n") if p]
    return lines + paragraphs[::8]


WORDS = {
    "latin": ["the", "The", "naïve", "café", "Straße", "Œuvre", "façade", "jalapeño", "über",
              "ÆSIR", "Ångström", "crème brûlée", "ﬁnance", "ǅemal"],
    "cjk": ["你好", "世界", "中文分词", "東京都", "日本語のテキスト", "カタカナ", "ひらがな",
            "한국어", "안녕하세요", "漢字と仮名", "𠀋𡈽𡌛"],
    "arabic": ["مرحبا", "بالعالم", "العربية", "كتاب", "سلام عليكم", "٠١٢٣٤٥٦٧٨٩"],
    "hebrew": ["שלום", "עולם", "עִבְרִית"],
    "devanagari": ["नमस्ते", "दुनिया", "हिन्दी", "संस्कृतम्", "०१२३४५६७८९"],
    "cyrillic": ["Привет", "мир", "русский", "ЁЛКА", "ёжик", "Україна", "Ґанок"],
    "greek": ["Γειά", "σου", "κόσμε", "ΑΒΓΔ", "ἀρχή", "ὕδωρ"],
    "thai": ["สวัสดี", "ภาษาไทย"],
    "other": ["ქართული", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ", "ⲀⲂⲄ", "ᏣᎳᎩ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙𝟚", "Ⅻ", "½¾"],
}

EMOJI = ["😀", "🙂", "👍", "👍🏽", "👋🏿", "❤️", "🏳️‍🌈", "👨‍👩‍👧‍👦", "👩🏾‍💻", "🧑‍🚀",
         "🇫🇷", "🇯🇵", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "✌🏻", "🤷‍♀️", "1️⃣", "#️⃣", "©️", "🫠", "🦀"]

# Decomposed and other non-NFC forms: NFC changes them (Qwen2 normalizes).
COMBINING = ["e\u0301", "E\u0300", "a\u0308", "o\u0302\u0323", "A\u030a", "\u212b", "\u2126",
             "n\u0303", "\u1100\u1161\u11a8", "\u1112\u1161\u11ab", "c\u0327", "i\u0307",
             "\u0301start", "x\u0336\u0336", "\u0915\u093c", "\u0627\u0653", "\uf900",
             "\u2fcf", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324"]

WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", " \n", "\n ",
              " \t ", "\u00a0", "\u3000", "\u2028", "\u0085", "\u2009", "\u200b", "\x0b", "\x0c",
              "        ", " \r", "\r"]

DIGITS = ["0", "7", "42", "123", "1234", "12345", "123456", "1234567", "3.14159", "1,000,000",
          "2024-05-20", "0x7fff", "1e-9", "٣٤٥", "१२३", "１２３", "²³", "10%", "$1,234.56"]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE", "'VE", "'M",
                "'LL", "'D", "'Re", "'lL", "\u2019s", "'ſ", "''", "'", "don't", "I'M",
                "they'LL", "we've", "it'S", "o'clock", "rock'n'roll"]

SPECIAL_SET = (set(llama3_specials()) | set(QWEN2_SPECIALS) |
               {"<|endoftext|>", "<mask>", "<sw>", "[[rs]]", "hello world"})

SPECIALS = ["<|endoftext|>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
            "<|start_header_id|>", "<|im_start|>", "<|im_end|>", "<|endof", "<|im_start",
            "<|endoftext|><|endoftext|>", "<mask>", " <mask> ", "<sw>", "x<sw>y", "[[rs]]",
            "hello world", "<|reserved_special_token_7|>", "<|fim_prefix|>"]

ODD = ["\x00", "\x01", "\x1b[31m", "\x7f", "\u200d", "\u200e", "\u202e", "\ufeff", "\ufffd",
       "\U0010ffff", "\ue000", "\U000e0001", "\ufe0f", "\\", "\\n", "&amp;", "<b>", "</b>",
       "http://example.com/a?b=c&d=e", "foo_bar-baz", "a.b.c", "...", "!!!", "???", "---",
       "~`@#$%^&*()", "\"quoted\"", "«guillemets»", "「括弧」", "—", "–", "…", "•", "‐",
       "ﬀ", "Ⓐⓑ", "🄰", "x" * 300, "ab" * 200, "é" * 150, " " * 40, "\n" * 12,
       "9" * 40, "A" * 5 + "\u0301" * 20]


def generated_texts(seed, count):
    rng = random.Random(seed)
    pools = [v for v in WORDS.values()] + [EMOJI, COMBINING, WHITESPACE, DIGITS, CONTRACTIONS,
                                            SPECIALS, ODD]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 14)):
            pool = rng.choice(pools)
            parts.append(rng.choice(pool))
            r = rng.random()
            if r < 0.45:
                parts.append(" ")
            elif r < 0.55:
                parts.append(rng.choice(WHITESPACE))
        texts.append("".join(parts))
    # Each item alone, and at the start and end of a line.
    for pool in pools:
        for item in pool:
            texts += [item, " " + item, item + " ", "a" + item + "b", item + item]
    texts += ["", " ", "\n", "hello", " hello", "Hello, world!", "   leading", "trailing   ",
              "tabs\tand\nnewlines\r\n", "I'm here; you're there. We'll see, they'd say."]
    return texts


def training_texts(lines, seed):
    rng = random.Random(seed)
    extra = generated_texts(seed + 1, 4000)
    out = list(lines) + extra
    rng.shuffle(out)
    return out


# ---- building the tokenizers -------------------------------------------------------------------

def train(normalizer, pre_tokenizer, vocab_size, texts):
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return json.loads(tok.to_str())


def added(content, tid, special=True, lstrip=False, rstrip=False, single_word=False,
          normalized=False):
    return {"id": tid, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": normalized, "special": special}


def byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True):
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space,
            "trim_offsets": trim_offsets, "use_regex": use_regex}


def build_gpt2(texts, vocab_size, prefix_space=False):
    """GPT-2: ByteLevel(use_regex) pre-tokenizer; <|endoftext|> in the model vocab and added.
    prefix_space: RoBERTa-like add_prefix_space, with added tokens using every flag."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space, use_regex=True)
    j = train(None, pre, vocab_size, texts)
    j["pre_tokenizer"] = byte_level(add_prefix_space=prefix_space)
    j["post_processor"] = byte_level(trim_offsets=False)
    j["decoder"] = byte_level()
    vocab = j["model"]["vocab"]
    n = len(vocab)
    vocab["<|endoftext|>"] = n
    j["added_tokens"] = [added("<|endoftext|>", n, normalized=True)]
    if prefix_space:
        j["added_tokens"] += [
            added("<mask>", n + 1, lstrip=True),
            added("<sw>", n + 2, special=False, single_word=True, normalized=True),
            added("[[rs]]", n + 3, special=False, rstrip=True, lstrip=True),
            added("hello world", n + 4, special=False, normalized=True),
        ]
    return j


def build_llama3(texts, vocab_size, pairs=False):
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    j = train(None, pre, vocab_size, texts)
    j["normalizer"] = None
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
         "invert": False},
        byte_level(add_prefix_space=False, trim_offsets=True, use_regex=False)]}
    j["model"]["ignore_merges"] = True
    n = len(j["model"]["vocab"])
    j["added_tokens"] = [added(s, n + i) for i, s in enumerate(llama3_specials())]
    bos = "<|begin_of_text|>"
    j["post_processor"] = {"type": "Sequence", "processors": [
        byte_level(add_prefix_space=True, trim_offsets=False, use_regex=True),
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                  {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}]}
    j["decoder"] = byte_level(add_prefix_space=True, trim_offsets=True, use_regex=True)
    return j


def build_qwen2(texts, vocab_size):
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    j = train(normalizers.NFC(), pre, vocab_size, texts)
    j["normalizer"] = {"type": "NFC"}
    j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated",
         "invert": False},
        byte_level(add_prefix_space=False, trim_offsets=False, use_regex=False)]}
    n = len(j["model"]["vocab"])
    j["added_tokens"] = [added(s, n + i) for i, s in enumerate(QWEN2_SPECIALS)]
    j["post_processor"] = byte_level(add_prefix_space=False, trim_offsets=False, use_regex=False)
    j["decoder"] = byte_level(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return j


def merges_as_pairs(j):
    """The same file with merges as [left, right] pairs (the format of tokenizers >= 0.20)."""
    k = json.loads(json.dumps(j))
    k["model"]["merges"] = [m.split(" ") for m in k["model"]["merges"]]
    return k


# ---- running and comparing ---------------------------------------------------------------------

def write_cases(path, texts, seqs):
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(texts)))
        for t in texts:
            b = t.encode("utf-8")
            f.write(struct.pack("<I", len(b)))
            f.write(b)
        f.write(struct.pack("<I", len(seqs)))
        for s in seqs:
            f.write(struct.pack("<I", len(s)))
            f.write(struct.pack(f"<{len(s)}i", *s))


class Out:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def i32(self):
        (v,) = struct.unpack_from("<i", self.data, self.pos)
        self.pos += 4
        return v

    def ids(self):
        (n,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        v = list(struct.unpack_from(f"<{n}i", self.data, self.pos))
        self.pos += 4 * n
        return v

    def text(self):
        (n,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        v = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return v


def check(name, j, json_for_cpp, texts, runner, tmp, failures):
    ref = Tokenizer.from_str(json.dumps(j))
    vocab = ref.get_vocab_size(with_added_tokens=True)
    t0 = time.time()
    want_special = [e.ids for e in ref.encode_batch(texts, add_special_tokens=True)]
    has_template = j.get("post_processor") and "TemplateProcessing" in json.dumps(
        j["post_processor"])
    want_plain = ([e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
                  if has_template else want_special)
    rng = random.Random(len(texts) + vocab)
    seqs = list(want_special)
    for _ in range(3000):
        seqs.append([rng.randrange(vocab) for _ in range(rng.randint(1, 24))])
    want_decode = ref.decode_batch(seqs, skip_special_tokens=False)
    want_skip = ref.decode_batch(seqs, skip_special_tokens=True)
    t_ref = time.time() - t0

    tok_path = os.path.join(tmp, f"{name}.json")
    with open(tok_path, "w", encoding="utf-8") as f:
        json.dump(json_for_cpp, f, ensure_ascii=False)
    cases, out_path = os.path.join(tmp, "cases.bin"), os.path.join(tmp, "out.bin")
    write_cases(cases, texts, seqs)
    t0 = time.time()
    subprocess.run([runner, tok_path, cases, out_path], check=True)
    t_ours = time.time() - t0
    with open(out_path, "rb") as f:
        out = Out(f.read())

    bad = []
    got_vocab, bos, eos = out.i32(), out.i32(), out.i32()
    if got_vocab != vocab:
        bad.append(f"vocab_size {got_vocab}, tokenizers says {vocab}")
    for i in range(got_vocab):
        t = out.text()
        if t != ref.id_to_token(i):
            bad.append(f"id_to_token({i}) = {t!r}, tokenizers says {ref.id_to_token(i)!r}")
            break
    if has_template and bos != ref.token_to_id("<|begin_of_text|>"):
        bad.append(f"bos_id {bos}")
    n_ids = 0
    for i, t in enumerate(texts):
        a, b = out.ids(), out.ids()
        n_ids += len(a)
        if a != want_special[i]:
            bad.append(f"encode({t!r}) =\n      {a}\n  tokenizers:\n      {want_special[i]}")
        if b != want_plain[i]:
            bad.append(f"encode({t!r}, add_special_tokens=False) =\n      {b}\n  tokenizers:"
                       f"\n      {want_plain[i]}")
    for i, s in enumerate(seqs):
        d, k, st = out.text(), out.text(), out.text()
        if d != want_decode[i]:
            bad.append(f"decode({s}) = {d!r}, tokenizers: {want_decode[i]!r}")
        if k != want_skip[i]:
            bad.append(f"decode({s}, skip_special_tokens) = {k!r}, tokenizers: {want_skip[i]!r}")
        if st != d:
            bad.append(f"streamed decode({s}) = {st!r}, decode: {d!r}")
    # What the corpus exercised here: special tokens found inside text, U+FFFD in decodes, and
    # (with a normalizer) texts that NFC changes.
    special_ids = {ref.token_to_id(s) for s in SPECIAL_SET} - {None}
    n_special = sum(1 for ids in want_plain for i in ids if i in special_ids)
    n_fffd = sum(1 for d in want_decode if "\ufffd" in d)
    if n_special == 0 or n_fffd == 0:
        bad.append(f"the corpus exercised too little: {n_special} special tokens matched, "
                   f"{n_fffd} decodes with U+FFFD")
    coverage = f"{n_special} special tokens in text, {n_fffd} decodes with U+FFFD"
    if j.get("normalizer"):
        n_nfc = sum(1 for t in texts if unicodedata.normalize("NFC", t) != t)
        coverage += f", {n_nfc} texts changed by NFC"
        if n_nfc == 0:
            bad.append("no text is changed by NFC")
    status = "ok" if not bad else f"{len(bad)} DIFFERENCES"
    print(f"{name}: vocab {vocab}, {len(texts)} texts ({n_ids} ids), {len(seqs)} decodes: "
          f"{status} (tokenizers {t_ref:.1f} s, meshtrain {t_ours:.1f} s incl. load; "
          f"{coverage})", flush=True)
    for msg in bad[:10]:
        print("  " + msg)
    if bad:
        failures.append(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runner", required=True)
    ap.add_argument("--corpus", required=True, help="the built-in corpus (default_corpus.txt)")
    ap.add_argument("--only", help="run only the configurations whose name contains this")
    ap.add_argument("--keep", help="write the tokenizer.json files into this directory")
    args = ap.parse_args()
    print(f"tokenizers {tokenizers.__version__}", flush=True)
    corpus = corpus_texts(args.corpus)
    texts = corpus + generated_texts(19, 20000)
    train_texts = training_texts(corpus, 5)
    print(f"{len(texts)} texts ({sum(len(t.encode()) for t in texts) / 1e6:.1f} MB): "
          f"{len(corpus)} lines and paragraphs of {args.corpus}, the rest generated", flush=True)

    configs = [
        ("gpt2-50k", lambda: build_gpt2(train_texts, 50256), None),
        ("gpt2-prefix-space-1k", lambda: build_gpt2(train_texts, 1000, prefix_space=True), None),
        ("llama3-32k", lambda: build_llama3(train_texts, 32000), None),
        ("llama3-300", lambda: build_llama3(train_texts, 300), None),
        ("qwen2-8k", lambda: build_qwen2(train_texts, 8000), None),
        ("qwen2-8k-pairs", lambda: build_qwen2(train_texts, 8000), merges_as_pairs),
    ]
    built = {}  # qwen2-8k and qwen2-8k-pairs share one training
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build, transform in configs:
            if args.only and args.only not in name:
                continue
            key = name.removesuffix("-pairs")
            if key not in built:
                built.clear()
                built[key] = build()
            j = built[key]
            cpp = transform(j) if transform else j
            if args.keep:
                os.makedirs(args.keep, exist_ok=True)
                with open(os.path.join(args.keep, f"{name}.json"), "w", encoding="utf-8") as f:
                    json.dump(cpp, f, ensure_ascii=False)
            check(name, j, cpp, texts, args.runner, tmp, failures)
    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("all configurations identical to tokenizers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
