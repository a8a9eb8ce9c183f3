#!/usr/bin/env python3
"""The op conformance suite: every op of runtime/ops.hpp, forward and backward, against PyTorch.

Each test builds seeded random cases with torch (never zeros; awkward shapes: T=1, widths that
are not multiples of 8, GPT-2's vocabulary padded from 50257 to 50304, B=3), writes them as
safetensors files, runs them all through one op_runner process on the device under test, and
compares every output with a reference that torch computes in float64 (autograd for the
backward ops) from the same inputs, already rounded to the case's dtype.

Tolerances are written next to each check, per dtype, as Tol(rel, of_scale): an element passes
when |got - want| <= rel * |want| + of_scale * scale + floor, where scale is max |want| over the
checked tensor unless the check gives a better one (for a sum, the sum of the magnitudes of its
terms: the error of floating-point summation is relative to that, not to the result), and floor
is half the smallest subnormal of the output dtype. Exact checks compare bits.

Run by ctest as
    /usr/bin/python3 test_ops_torch.py --runner build/.../op_runner [--device cpu]
Exits non-zero on any mismatch and prints the op, the case, the element and by how much.
A case whose kernel raises "not implemented yet" is reported as skipped, never as passed.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

import torch

F32, BF16, F16, I32 = torch.float32, torch.bfloat16, torch.float16, torch.int32
FLOATS = (F32, BF16, F16)
ST_NAME = {F32: "F32", BF16: "BF16", F16: "F16", I32: "I32"}
ST_DTYPE = {v: k for k, v in ST_NAME.items()}
CPP_NAME = {F32: "fp32", BF16: "bf16", F16: "fp16"}
SHORT = {F32: "f32", BF16: "bf16", F16: "f16"}

# Relative size of one unit in the last place at its largest (just above a power of two):
# 2^(1-p) for p bits of significand. A correctly rounded result is within half of this.
ULP = {F32: 2.0**-23, BF16: 2.0**-7, F16: 2.0**-10}
# Half the smallest subnormal: the rounding error of results too small to be normal.
FLOOR = {F32: 2.0**-150, BF16: 2.0**-134, F16: 2.0**-25, I32: 0.0, torch.float64: 0.0}

OPTIONS = argparse.Namespace(runner=None, device="cpu")
STATS = {}  # op -> (cases, worst error / allowed, where)


class Tol:
    def __init__(self, rel, of_scale):
        self.rel, self.of_scale = rel, of_scale

    def __repr__(self):
        return f"rel {self.rel:.3g} x |want| + {self.of_scale:.3g} x scale"


EXACT = Tol(0.0, 0.0)

# Rounding a result computed in fp32 to the output dtype costs up to half an ulp; the checks below
# allow one (two for fp32 itself), which leaves room for the fp32 error and for double rounding
# without hiding real bugs (a bf16 ulp is 0.8%).
ROUNDED = {F32: Tol(2 * ULP[F32], 0), BF16: Tol(ULP[BF16], 0), F16: Tol(ULP[F16], 0)}


# ---- safetensors with json + struct + torch.frombuffer ---------------------------------------

def write_safetensors(path, tensors, metadata):
    header, chunks, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        raw = (t.view(torch.int16) if t.dtype == BF16 else t).numpy().tobytes()
        header[name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    metadata = header.pop("__metadata__", {})
    data = blob[8 + n:]
    tensors = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        dtype = ST_DTYPE[e["dtype"]]
        if begin == end:
            tensors[name] = torch.empty(e["shape"], dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(bytearray(data[begin:end]),
                                             dtype=dtype).reshape(e["shape"])
    return tensors, metadata


# ---- cases and checks ------------------------------------------------------------------------

def f32(x):
    """x rounded to the nearest float32, as the C++ side parses it."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Case:
    def __init__(self, op, name, inputs, meta=None):
        self.op, self.name, self.inputs = op, f"{op}/{name}", inputs
        self.meta = dict(meta or {})
        self.checks = []

    def check(self, output, want, tol, scale=None, select=None, label=None):
        """Compares output (a tensor name, or "result" for a scalar result) with want."""
        self.checks.append((output, want, tol, scale, select, label or output))
        return self

    def exact(self, output, want, select=None, label=None):
        return self.check(output, want, EXACT, select=select, label=label)


def generator(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def randn(g, shape, dtype, std=1.0, mean=0.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)


def describe_index(shape, flat):
    idx = []
    for d in reversed(shape):
        idx.append(flat % d)
        flat //= d
    return "[" + ", ".join(str(i) for i in reversed(idx)) + "]"


def compare(case, label, got, want, tol, scale):
    """Returns (failure message or None, worst error / allowed)."""
    if tuple(got.shape) != tuple(want.shape):
        return f"{case.name}: '{label}' has shape {list(got.shape)}, expected {list(want.shape)}", 0
    if got.numel() == 0:
        return None, 0.0
    if tol is EXACT:
        g, w = got.double().flatten(), want.double().flatten()
        same = (g == w) | (torch.isnan(g) & torch.isnan(w))
        bits = {F32: torch.int32, BF16: torch.int16, F16: torch.int16}.get(got.dtype)
        if got.dtype == want.dtype and bits is not None:
            same = (got.flatten().view(bits) == want.flatten().view(bits)) | (
                torch.isnan(g) & torch.isnan(w))
        bad = (~same).nonzero().flatten()
        if len(bad) == 0:
            return None, 0.0
        i = bad[0].item()
        return (f"{case.name}: '{label}' ({ST_NAME.get(got.dtype, got.dtype)}{list(got.shape)}): "
                f"{len(bad)} of {got.numel()} elements differ (exact check); first at "
                f"{describe_index(list(got.shape), i)}: got {g[i].item()!r}, "
                f"want {w[i].item()!r}"), math.inf
    g, w = got.double(), want.double()
    if scale is None:
        scale = w[torch.isfinite(w)].abs().max() if torch.isfinite(w).any() else 0.0
    allowed = tol.rel * w.abs() + tol.of_scale * scale + FLOOR[got.dtype]
    err = (g - w).abs()
    # Non-finite wants (inf from overflow, NaN from NaN input) must be matched exactly.
    nonfinite = ~torch.isfinite(w)
    ok = (err <= allowed) & ~nonfinite
    ok |= nonfinite & ((g == w) | (torch.isnan(g) & torch.isnan(w)))
    ratio = torch.where(ok & ~nonfinite, err / allowed.clamp_min(1e-300), torch.zeros_like(err))
    ratio = torch.where(ok, ratio, torch.full_like(err, math.inf))
    worst = ratio.max().item()
    if ok.all():
        return None, worst
    bad = (~ok).flatten().nonzero().flatten()
    # Report the worst finite offender, else the first non-finite one.
    excess = torch.where(~ok, err - allowed, torch.full_like(err, -math.inf)).flatten()
    excess = torch.nan_to_num(excess, nan=math.inf)
    i = excess.argmax().item()
    a = allowed.expand_as(w).flatten()[i].item()
    s = float(scale.flatten()[i] if torch.is_tensor(scale) and scale.numel() > 1 else scale)
    return (f"{case.name}: '{label}' ({ST_NAME.get(got.dtype, got.dtype)}{list(got.shape)}): "
            f"{len(bad)} of {got.numel()} elements out of tolerance; worst at "
            f"{describe_index(list(got.shape), i)}: got {g.flatten()[i].item():.9g}, want "
            f"{w.flatten()[i].item():.9g}, |error| {err.flatten()[i].item():.3g} > allowed "
            f"{a:.3g} ({tol!r}, scale {s:.3g})"), worst


def run_cases(cases, threads=None):
    """Runs every case through one op_runner process; returns [(tensors, metadata)]."""
    with tempfile.TemporaryDirectory(prefix="meshtrain_ops_") as tmp:
        in_dir, out_dir = os.path.join(tmp, "in"), os.path.join(tmp, "out")
        os.makedirs(in_dir)
        for i, c in enumerate(cases):
            write_safetensors(os.path.join(in_dir, f"{i:04d}.safetensors"), c.inputs,
                              {"op": c.op, "case": c.name, **c.meta})
        command = [OPTIONS.runner, "--device", OPTIONS.device, "--in", in_dir, "--out", out_dir]
        if threads is not None:
            command += ["--threads", str(threads)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=550)
        if proc.returncode != 0:
            raise RuntimeError(f"op_runner failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return [read_safetensors(os.path.join(out_dir, f"{i:04d}.safetensors"))
                for i in range(len(cases))]


def note(op, worst, where, cases=0):
    """Keeps, per op, the number of cases run and the largest error / allowed seen."""
    n, best, best_where = STATS.get(op, (0, 0.0, ""))
    if worst > best:
        best, best_where = worst, where
    STATS[op] = (n + cases, best, best_where)


class OpTest(unittest.TestCase):
    def run_and_check(self, cases):
        results = run_cases(cases)
        for case, (tensors, meta) in zip(cases, results):
            with self.subTest(case=case.name):
                if "error" in meta:
                    if "not implemented yet" in meta["error"]:
                        self.skipTest(f"{case.name}: kernel missing: {meta['error']}")
                    self.fail(f"{case.name}: the op raised: {meta['error']}")
                failures = []
                for output, want, tol, scale, select, label in case.checks:
                    if output == "result":
                        got = torch.tensor([float(meta["result"])], dtype=torch.float64)
                        want = torch.tensor([float(want)], dtype=torch.float64)
                    else:
                        if output not in tensors:
                            failures.append(f"{case.name}: no output '{output}'")
                            continue
                        got = tensors[output]
                    if select is not None:
                        got, want = select(got), select(want)
                        if torch.is_tensor(scale) and scale.numel() > 1:
                            scale = select(scale)
                    msg, worst = compare(case, label, got, want, tol, scale)
                    if msg:
                        failures.append(msg)
                    note(case.op, worst, f"{case.name} '{label}'")
                note(case.op, 0.0, "", cases=1)
                if failures:
                    self.fail("\n".join(failures))


def matmul_ref(a, b, trans_a=False, trans_b=False):
    """op(a) @ op(b) in float64 and the elementwise error scale |op(a)| @ |op(b)|."""
    a64, b64 = a.double(), b.double()
    if trans_a:
        a64 = a64.t()
    if trans_b:
        b64 = b64.t()
    return a64 @ b64, a64.abs() @ b64.abs()


# ---- matmul and linear -----------------------------------------------------------------------

# fp32 accumulation over K <= 200 errs by at most about K * 2^-24 of sum |a||b| (1.2e-5, and
# far less for random signs); then one rounding to out's dtype. Keyed by out's dtype.
MATMUL_TOL = {dt: Tol(ROUNDED[dt].rel, 1e-5) for dt in FLOATS}


class Matmul(OpTest):
    def test_matmul(self):
        cases = []
        for dt in FLOATS:
            for m, k, n in [(1, 13, 36), (15, 36, 13), (33, 64, 50), (130, 200, 97)]:
                for ta in (False, True):
                    for tb in (False, True):
                        name = f"{SHORT[dt]}/m{m}k{k}n{n}/ta{int(ta)}tb{int(tb)}"
                        g = generator(name)
                        a = randn(g, (k, m) if ta else (m, k), dt)
                        b = randn(g, (n, k) if tb else (k, n), dt)
                        want, scale = matmul_ref(a, b, ta, tb)
                        cases.append(Case("matmul", name, {"a": a, "b": b},
                                          {"trans_a": int(ta), "trans_b": int(tb)})
                                     .check("out", want, MATMUL_TOL[dt], scale))
            # a [B, T, K] with flattened leading dimensions, T = 1 and T = 5.
            for t in (1, 5):
                name = f"{SHORT[dt]}/batched/b3t{t}"
                g = generator(name)
                a, b = randn(g, (3, t, 36), dt), randn(g, (36, 13), dt)
                want, scale = matmul_ref(a.reshape(-1, 36), b)
                cases.append(Case("matmul", name, {"a": a, "b": b})
                             .check("out", want.reshape(3, t, 13), MATMUL_TOL[dt],
                                    scale.reshape(3, t, 13)))
            # bias in out's dtype and in fp32.
            for bias_dt in sorted({dt, F32}, key=str):
                name = f"{SHORT[dt]}/bias_{SHORT[bias_dt]}"
                g = generator(name)
                a, b = randn(g, (15, 36), dt), randn(g, (13, 36), dt)
                bias = randn(g, (13,), bias_dt)
                want, scale = matmul_ref(a, b, trans_b=True)
                cases.append(Case("matmul", name, {"a": a, "b": b, "bias": bias},
                                  {"trans_b": 1})
                             .check("out", want + bias.double(), MATMUL_TOL[dt],
                                    scale + bias.double().abs()))
            # out += a @ b, into out of the operands' dtype and into fp32 (weight gradients).
            for out_dt in sorted({dt, F32}, key=str):
                for ta in (False, True):
                    name = f"{SHORT[dt]}/accumulate_{SHORT[out_dt]}/ta{int(ta)}"
                    g = generator(name)
                    a = randn(g, (36, 15) if ta else (15, 36), dt)
                    b = randn(g, (36, 13), dt)
                    out = randn(g, (15, 13), out_dt)
                    want, scale = matmul_ref(a, b, trans_a=ta)
                    cases.append(Case("matmul", name, {"a": a, "b": b, "out": out},
                                      {"trans_a": int(ta), "accumulate": 1,
                                       "out_dtype": CPP_NAME[out_dt]})
                                 .check("out", want + out.double(), MATMUL_TOL[out_dt],
                                        scale + out.double().abs()))
            # fp32 out of 16-bit operands, written.
            if dt != F32:
                name = f"{SHORT[dt]}/out_f32"
                g = generator(name)
                a, b = randn(g, (33, 64), dt), randn(g, (64, 50), dt)
                want, scale = matmul_ref(a, b)
                cases.append(Case("matmul", name, {"a": a, "b": b}, {"out_dtype": "fp32"})
                             .check("out", want, MATMUL_TOL[F32], scale))
        self.run_and_check(cases)

    def test_linear(self):
        cases = []
        for dt in FLOATS:
            for (b_, t, c, o) in [(3, 5, 36, 50), (3, 1, 13, 36), (1, 1, 36, 13)]:
                for with_bias in (False, True):
                    name = f"{SHORT[dt]}/b{b_}t{t}c{c}o{o}/bias{int(with_bias)}"
                    g = generator(name)
                    x, w = randn(g, (b_, t, c), dt), randn(g, (o, c), dt)
                    inputs = {"x": x, "w": w}
                    want, scale = matmul_ref(x.reshape(-1, c), w, trans_b=True)
                    if with_bias:
                        inputs["bias"] = randn(g, (o,), dt)
                        want = want + inputs["bias"].double()
                        scale = scale + inputs["bias"].double().abs()
                    cases.append(Case("linear_forward", name, inputs)
                                 .check("y", want.reshape(b_, t, o), MATMUL_TOL[dt],
                                        scale.reshape(b_, t, o)))
                for with_dx, with_dbias in [(True, True), (False, True), (True, False)]:
                    name = f"{SHORT[dt]}/b{b_}t{t}c{c}o{o}/dx{int(with_dx)}dbias{int(with_dbias)}"
                    g = generator(name)
                    x, w = randn(g, (b_, t, c), dt), randn(g, (o, c), dt)
                    dy = randn(g, (b_, t, o), dt)
                    dw = randn(g, (o, c), F32)
                    inputs = {"x": x, "w": w, "dy": dy, "dw": dw}
                    dy2, x2 = dy.reshape(-1, o), x.reshape(-1, c)
                    case = Case("linear_backward", name, inputs, {"with_dx": int(with_dx)})
                    if with_dx:
                        want, scale = matmul_ref(dy2, w)
                        case.check("dx", want.reshape(b_, t, c), MATMUL_TOL[dt],
                                   scale.reshape(b_, t, c))
                    want, scale = matmul_ref(dy2, x2, trans_a=True)
                    # dw is fp32 and accumulated.
                    case.check("dw", dw.double() + want, MATMUL_TOL[F32],
                               dw.double().abs() + scale)
                    if with_dbias:
                        inputs["dbias"] = randn(g, (o,), F32)
                        case.check("dbias", inputs["dbias"].double() + dy2.double().sum(0),
                                   MATMUL_TOL[F32],
                                   inputs["dbias"].double().abs() + dy2.double().abs().sum(0))
                    cases.append(case)
            # Qwen2's attention: a bias on the fused q/k/v projection only (n_head 4, n_kv_head 2,
            # D 8: 64 outputs), none on the output projection (bias0 cases above).
            name = f"{SHORT[dt]}/qwen2_qkv_bias"
            g = generator(name)
            x, w, bias = randn(g, (2, 5, 32), dt), randn(g, (64, 32), dt), randn(g, (64,), dt)
            want, scale = matmul_ref(x.reshape(-1, 32), w, trans_b=True)
            cases.append(Case("linear_forward", name, {"x": x, "w": w, "bias": bias})
                         .check("y", (want + bias.double()).reshape(2, 5, 64), MATMUL_TOL[dt],
                                (scale + bias.double().abs()).reshape(2, 5, 64)))
        self.run_and_check(cases)


# ---- elementwise -----------------------------------------------------------------------------

# Summation in fp32 over at most 1000 rows in fixed chunks: error below about 1e-5 of the sum of
# magnitudes; dbias is fp32 whatever dy's dtype.
BIAS_BACKWARD_TOL = Tol(ULP[F32], 1e-5)


class Elementwise(OpTest):
    def test_bias_backward(self):
        cases = []
        for dt in FLOATS:
            for shape in [(15, 36), (1, 13), (3, 5, 36), (1000, 50)]:
                name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}"
                g = generator(name)
                dy, dbias = randn(g, shape, dt), randn(g, (shape[-1],), F32)
                rows = dy.double().reshape(-1, shape[-1])
                cases.append(Case("bias_backward", name, {"dy": dy, "dbias": dbias})
                             .check("dbias", dbias.double() + rows.sum(0), BIAS_BACKWARD_TOL,
                                    dbias.double().abs() + rows.abs().sum(0)))
        self.run_and_check(cases)

    def test_add(self):
        # One fp32 addition, then one rounding to the dtype.
        tol = ROUNDED
        cases = []
        for dt in FLOATS:
            for shape in [(3, 5, 36), (13,), (3, 1, 13), (3, 129, 101)]:
                for alias in ("none", "a", "b"):
                    name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/alias_{alias}"
                    g = generator(name)
                    a, b = randn(g, shape, dt, 2.0), randn(g, shape, dt, 0.5)
                    cases.append(Case("add", name, {"a": a, "b": b}, {"alias": alias})
                                 .check("out", a.double() + b.double(), tol[dt]))
        self.run_and_check(cases)

    def test_gelu(self):
        # fp32 tanh is good to a few ulp; where 1 + tanh cancels (x < -3) the absolute error
        # stays below 1e-6 of the largest output. 16-bit: one rounding of that fp32 result.
        tol = {F32: Tol(1e-5, 1e-6), BF16: Tol(ULP[BF16], 1e-5), F16: Tol(ULP[F16], 1e-5)}
        cases = []
        for dt in FLOATS:
            for shape, std in [((3, 5, 36), 2.0), ((1, 1, 13), 1.0), ((4, 64, 130), 3.0),
                               ((3, 7), 8.0)]:
                name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/std{std}"
                g = generator(name)
                x = randn(g, shape, dt, std)
                x64 = x.double().requires_grad_()
                y = torch.nn.functional.gelu(x64, approximate="tanh")
                cases.append(Case("gelu_forward", name, {"x": x}).check("y", y.detach(), tol[dt]))
                for alias in ("none", "dy"):
                    dy = randn(g, shape, dt)
                    (dx,) = torch.autograd.grad(y, x64, dy.double(), retain_graph=True)
                    cases.append(Case("gelu_backward", f"{name}/alias_{alias}",
                                      {"x": x, "dy": dy}, {"alias": alias})
                                 .check("dx", dx, tol[dt]))
            # Far tails, where x^3 overflows fp32 and tanh saturates: gelu is x or -0, its
            # derivative 1 or 0; checked against each element's own magnitude.
            big = {F32: [1e20, 3e38, 1e5, 60.0], BF16: [1e20, 3e38, 1e5, 60.0],
                   F16: [6e4, 1e4, 300.0, 60.0]}[dt]
            x = torch.tensor(big + [-v for v in big], dtype=torch.float64).to(dt)
            x64 = x.double().requires_grad_()
            y = torch.nn.functional.gelu(x64, approximate="tanh")
            dy = torch.linspace(0.5, 2.0, x.numel(), dtype=torch.float64).to(dt)
            (dx,) = torch.autograd.grad(y, x64, dy.double())
            cases.append(Case("gelu_forward", f"{SHORT[dt]}/tails", {"x": x})
                         .check("y", y.detach(), Tol(tol[dt].rel, 0)))
            cases.append(Case("gelu_backward", f"{SHORT[dt]}/tails", {"x": x, "dy": dy})
                         .check("dx", dx, Tol(tol[dt].rel, 0)))
        self.run_and_check(cases)

    def test_convert(self):
        # Round to nearest, ties to even, NaN stays NaN, overflow becomes Inf: the same bits as
        # torch's own conversion.
        g = generator("convert")
        special = torch.tensor([
            0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 65504.0, 65519.0, 65520.0,
            70000.0, -1e6, 6.1e-5, 1e-6, 3e-8, 2.9e-8, 1e-40, 3.4e38, -3.4e38, 1e-45,
        ], dtype=F32)
        # Exact ties: the bits below bf16's (or fp16's) last kept bit are exactly one half.
        ties_bf16 = (torch.randint(0x3f000000, 0x40800000, (200,), generator=g,
                                   dtype=torch.int64) & ~0xffff | 0x8000).to(I32).view(F32)
        ties_f16 = (torch.randint(0x38800000, 0x47000000, (200,), generator=g,
                                  dtype=torch.int64) & ~0x1fff | 0x1000).to(I32).view(F32)
        small = randn(g, (70000,), F32, 100.0)
        src32 = torch.cat([special, ties_bf16, ties_f16, small])
        cases = []
        for src_dt in FLOATS:
            src = src32.to(src_dt)
            for dst_dt in FLOATS:
                for n in (13, src.numel()):
                    name = f"{SHORT[src_dt]}_to_{SHORT[dst_dt]}/n{n}"
                    cases.append(Case("convert", name, {"src": src[:n].clone()},
                                      {"dtype": CPP_NAME[dst_dt]})
                                 .exact("dst", src[:n].to(dst_dt)))
        self.run_and_check(cases)

    def test_scale(self):
        # The fp32 product, then a rounding to the dtype.
        tol = ROUNDED
        cases = []
        for dt in FLOATS:
            for shape in [(13,), (3, 5, 36), (100003,)]:
                for alpha in (0.37, -3.1):
                    name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/alpha{alpha}"
                    g = generator(name)
                    x = randn(g, shape, dt, 2.0)
                    a = f32(alpha)
                    cases.append(Case("scale_", name, {"x": x}, {"alpha": repr(a)})
                                 .check("x", x.double() * a, tol[dt]))
        self.run_and_check(cases)


# ---- layernorm -------------------------------------------------------------------------------

def layernorm_stats(x, eps):
    x64 = x.double()
    mean = x64.mean(-1)
    rstd = 1.0 / torch.sqrt(x64.var(-1, unbiased=False) + eps)
    return mean, rstd


class LayerNorm(OpTest):
    # (shape, std, mean of x): an offset mean tests the two-pass variance; a tiny std makes
    # the variance comparable to eps, so that eps must enter exactly where torch puts it.
    SHAPES = [((3, 5, 36), 2.0, 3.0), ((3, 1, 13), 2.0, 3.0), ((2, 3, 768), 2.0, 3.0),
              ((4, 64, 130), 2.0, 3.0), ((3, 5, 36), 0.003, 0.0)]

    def test_layernorm_forward(self):
        # Statistics are fp32 from exact inputs whatever x's dtype: the mean within 1e-5 of
        # max |x| (C <= 768 terms), rstd within 1e-5 relative. y: fp32 within 1e-5 of the
        # largest output; 16-bit adds one rounding.
        y_tol = {F32: Tol(1e-5, 1e-5), BF16: Tol(ULP[BF16], 1e-5), F16: Tol(ULP[F16], 1e-5)}
        stats_tol = Tol(1e-5, 1e-5)
        eps = f32(1e-5)
        cases = []
        for dt in FLOATS:
            for shape, x_std, x_mean in self.SHAPES:
                name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/std{x_std}"
                g = generator(name)
                c = shape[-1]
                x = randn(g, shape, dt, x_std, x_mean)
                w, b = randn(g, (c,), dt, 0.3, 1.0), randn(g, (c,), dt, 0.5)
                mean, rstd = layernorm_stats(x, eps)
                y = torch.nn.functional.layer_norm(x.double(), (c,), w.double(), b.double(), eps)
                cases.append(Case("layernorm_forward", name, {"x": x, "weight": w, "bias": b},
                                  {"eps": repr(eps)})
                             .check("y", y, y_tol[dt])
                             .check("mean", mean, stats_tol, x.double().abs().max())
                             .check("rstd", rstd, stats_tol))
        self.run_and_check(cases)

    def test_layernorm_backward(self):
        # dx: fp32 within 1e-5 of the largest element (the row means cancel); 16-bit adds one
        # rounding (two with accumulate_dx). dweight, dbias: fp32 sums over rows, within 1e-5
        # of the sum of magnitudes.
        dx_tol = {F32: Tol(1e-5, 1e-5), BF16: Tol(ULP[BF16], 1e-5), F16: Tol(ULP[F16], 1e-5)}
        sum_tol = Tol(ULP[F32], 1e-5)
        eps = f32(1e-5)
        cases = []
        for dt in FLOATS:
            for shape, x_std, x_mean in self.SHAPES:
                for accumulate_dx in (False, True):
                    name = (f"{SHORT[dt]}/{'x'.join(map(str, shape))}/std{x_std}/"
                            f"acc{int(accumulate_dx)}")
                    g = generator(name)
                    c = shape[-1]
                    x = randn(g, shape, dt, x_std, x_mean)
                    w, b = randn(g, (c,), dt, 0.3, 1.0), randn(g, (c,), dt, 0.5)
                    dy = randn(g, shape, dt)
                    mean, rstd = layernorm_stats(x, eps)
                    dweight, dbias = randn(g, (c,), F32), randn(g, (c,), F32)
                    inputs = {"x": x, "weight": w, "dy": dy, "mean": mean.float(),
                              "rstd": rstd.float(), "dweight": dweight, "dbias": dbias}
                    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
                    y = torch.nn.functional.layer_norm(x64, (c,), w64, b64, eps)
                    dx, dw, db = torch.autograd.grad(y, (x64, w64, b64), dy.double())
                    if accumulate_dx:
                        inputs["dx"] = randn(g, shape, dt)
                        dx = dx + inputs["dx"].double()
                    norm = (x.double() - mean[..., None]) * rstd[..., None]
                    rows = lambda t: t.reshape(-1, c)
                    cases.append(Case("layernorm_backward", name, inputs,
                                      {"accumulate_dx": int(accumulate_dx)})
                                 .check("dx", dx, dx_tol[dt])
                                 .check("dweight", dweight.double() + dw, sum_tol,
                                        dweight.double().abs() +
                                        rows((dy.double() * norm).abs()).sum(0))
                                 .check("dbias", dbias.double() + db, sum_tol,
                                        dbias.double().abs() + rows(dy.double().abs()).sum(0)))
        self.run_and_check(cases)


# ---- RMSNorm (Llama, Qwen2) ------------------------------------------------------------------

def rmsnorm_ref(x, w, eps):
    """Hugging Face's LlamaRMSNorm in float64: x * rsqrt(mean(x^2) + eps) from the fp32 input,
    rounded to the input's dtype (HF's hidden_states.to(input_dtype); nothing for fp32), times
    the weight. Returns (y before the product's rounding, rstd)."""
    x64 = x.double()
    rstd = torch.rsqrt(x64.pow(2).mean(-1) + eps)
    normed = x64 * rstd[..., None]
    if x.dtype != F32:
        normed = normed.to(x.dtype).double()
    return w.double() * normed, rstd


class RMSNorm(OpTest):
    # (shape, std of x): a tiny std makes mean(x^2) comparable to eps, so that eps must enter
    # exactly where HF puts it; 4096 is Llama 3 8B's width.
    SHAPES = [((3, 5, 36), 2.0), ((3, 1, 13), 2.0), ((2, 3, 768), 1.0), ((4, 64, 130), 3.0),
              ((2, 2, 4096), 1.0), ((3, 5, 36), 0.001)]
    EPS = (1e-6, 1e-5)  # Qwen2 (and transformers' default); Llama 3
    # y: fp32 from an fp32 mean square (C <= 4096 terms) and rsqrt: within 1e-5 relative.
    # 16-bit: the reference rounds x * rstd to the dtype as HF does; our fp32 x * rstd may fall
    # on the other side of a rounding boundary (1 ulp of it), then y is rounded (half an ulp):
    # 1.5 ulp. rstd: fp32, within 1e-5 relative.
    Y_TOL = {F32: Tol(1e-5, 1e-6), BF16: Tol(1.5 * ULP[BF16], 0), F16: Tol(1.5 * ULP[F16], 0)}
    RSTD_TOL = Tol(1e-5, 0)

    def make(self, dt, shape, std, eps, extra=""):
        name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/std{std}/eps{eps}{extra}"
        g = generator(name)
        x = randn(g, shape, dt, std)
        w = randn(g, (shape[-1],), dt, 0.3, 1.0)
        return name, g, x, w

    def test_rmsnorm_forward(self):
        cases = []
        for dt in FLOATS:
            for shape, std in self.SHAPES:
                for eps in self.EPS:
                    eps = f32(eps)
                    name, _, x, w = self.make(dt, shape, std, eps)
                    y, rstd = rmsnorm_ref(x, w, eps)
                    cases.append(Case("rmsnorm_forward", name, {"x": x, "weight": w},
                                      {"eps": repr(eps)})
                                 .check("y", y, self.Y_TOL[dt])
                                 .check("rstd", rstd, self.RSTD_TOL))
        self.run_and_check(cases)

    def test_residual_rmsnorm_forward(self):
        # sum: one fp32 addition, one rounding (as add). y and rstd from the rounded sum.
        cases = []
        for dt in FLOATS:
            for shape, std in self.SHAPES[:4]:
                for alias in ("none", "a", "b"):
                    eps = f32(1e-6)
                    name, g, a, w = self.make(dt, shape, std, eps, f"/alias_{alias}")
                    b = randn(g, shape, dt, 0.5)
                    total = (a.double() + b.double()).to(dt)
                    y, rstd = rmsnorm_ref(total, w, eps)
                    cases.append(Case("residual_rmsnorm_forward", name,
                                      {"a": a, "b": b, "weight": w},
                                      {"eps": repr(eps), "alias": alias})
                                 .check("sum", a.double() + b.double(), ROUNDED[dt])
                                 .check("y", y, self.Y_TOL[dt])
                                 .check("rstd", rstd, self.RSTD_TOL))
        self.run_and_check(cases)

    def test_rmsnorm_backward(self):
        # Against autograd of weight * x * rstd in float64 (the forward's rounding of x * rstd
        # has no gradient). dx: fp32 within 1e-5 of the largest element (the row's dot product
        # cancels); 16-bit adds one rounding (two with accumulate_dx). dweight: fp32 sums over
        # rows, within 1e-5 of the sum of magnitudes.
        dx_tol = {F32: Tol(1e-5, 1e-5), BF16: Tol(ULP[BF16], 1e-5), F16: Tol(ULP[F16], 1e-5)}
        sum_tol = Tol(ULP[F32], 1e-5)
        cases = []
        for dt in FLOATS:
            for shape, std in self.SHAPES:
                for accumulate_dx in (False, True):
                    eps = f32(1e-6)
                    name, g, x, w = self.make(dt, shape, std, eps, f"/acc{int(accumulate_dx)}")
                    c = shape[-1]
                    dy = randn(g, shape, dt)
                    x64, w64 = (t.double().requires_grad_() for t in (x, w))
                    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
                    y = w64 * (x64 * rstd)
                    dx, dw = torch.autograd.grad(y, (x64, w64), dy.double())
                    dweight = randn(g, (c,), F32)
                    inputs = {"x": x, "weight": w, "dy": dy, "rstd": rstd.detach()[..., 0].float(),
                              "dweight": dweight}
                    if accumulate_dx:
                        inputs["dx"] = randn(g, shape, dt)
                        dx = dx + inputs["dx"].double()
                    normed = (x.double() * rstd.detach()).reshape(-1, c)
                    cases.append(Case("rmsnorm_backward", name, inputs,
                                      {"accumulate_dx": int(accumulate_dx)})
                                 .check("dx", dx, dx_tol[dt])
                                 .check("dweight", dweight.double() + dw, sum_tol,
                                        dweight.double().abs() +
                                        (dy.double().reshape(-1, c) * normed).abs().sum(0)))
        self.run_and_check(cases)


# ---- SwiGLU (Llama, Qwen2 MLP) ---------------------------------------------------------------

def swiglu_ref(x):
    """silu(gate) * up in float64 from the fused [.., 2F] gate | up, as LlamaMLP's
    act_fn(gate_proj(x)) * up_proj(x)."""
    gate, up = x.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class SwiGLU(OpTest):
    # (shape of the fused input [.., 2F], std): F = 18, 7, 65, 96 (not multiples of 16).
    SHAPES = [((3, 5, 36), 2.0), ((3, 1, 14), 1.0), ((4, 64, 130), 3.0), ((2, 192), 8.0)]
    # fp32: exp within 2 ulp, then a division and two products: within 1e-6 relative.
    # 16-bit: one rounding of that. Backward: silu' = s (1 + g (1 - s)) is 0 near g = -1.28,
    # where its terms cancel: an of_scale of the largest gradient covers that.
    FWD_TOL = {F32: Tol(1e-6, 0), BF16: ROUNDED[BF16], F16: ROUNDED[F16]}
    BWD_TOL = {F32: Tol(1e-6, 1e-6), BF16: Tol(ULP[BF16], 1e-6), F16: Tol(ULP[F16], 1e-6)}

    def cases_for(self, dt, name, x, dy):
        x64 = x.double().requires_grad_()
        y = swiglu_ref(x64)
        (dx,) = torch.autograd.grad(y, x64, dy.double())
        out = [Case("swiglu_forward", name, {"x": x}).check("y", y.detach(), self.FWD_TOL[dt])]
        for alias in ("none", "x"):
            out.append(Case("swiglu_backward", f"{name}/alias_{alias}", {"x": x.clone(), "dy": dy},
                            {"alias": alias}).check("dx", dx, self.BWD_TOL[dt]))
        return out

    def test_swiglu(self):
        cases = []
        for dt in FLOATS:
            for shape, std in self.SHAPES:
                name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}/std{std}"
                g = generator(name)
                x = randn(g, shape, dt, std)
                dy = randn(g, shape[:-1] + (shape[-1] // 2,), dt)
                cases += self.cases_for(dt, name, x, dy)
            # Far tails: silu is 0 or the gate itself, its derivative 0 or 1 (no 0 * inf); up and
            # dy in [0.5, 1] keep the products finite. Checked against each element's own size.
            big = {F32: [3e38, 1e20, 1e4, 60.0], BF16: [3e38, 1e20, 1e4, 60.0],
                   F16: [6e4, 1e4, 300.0, 60.0]}[dt]
            gate = torch.tensor(big + [-v for v in big], dtype=torch.float64)
            up = torch.linspace(0.5, 1.0, gate.numel(), dtype=torch.float64)
            x = torch.cat([gate, up]).to(dt)[None]
            dy = torch.linspace(1.0, 0.5, gate.numel(), dtype=torch.float64).to(dt)[None]
            for c in self.cases_for(dt, f"{SHORT[dt]}/tails", x, dy):
                c.checks = [(o, w, Tol(t.rel, 0), s, sel, l) for o, w, t, s, sel, l in c.checks]
                cases.append(c)
        self.run_and_check(cases)


# ---- rotary position embeddings (Llama, Qwen2) -----------------------------------------------

def rope_inv_freq_ref(head_dim, theta, scaling=None):
    """The inverse frequencies in float64, as transformers computes them: the exponent 2i / D
    formed in fp32 (torch.arange(0, D, 2).float() / D), theta ** -exponent; then, for "llama3",
    Llama 3.1's scaling as written in transformers' _compute_llama3_parameters (its wavelength
    bands and smooth interpolation), and for "linear", division by the factor."""
    exponent = (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim).double()
    inv_freq = 1.0 / (theta ** exponent)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    assert scaling["rope_type"] == "llama3"
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x):
    """transformers' rotate_half (Llama, Qwen2)."""
    x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x, table, n_head, n_kv_head, pos0):
    """transformers' apply_rotary_pos_emb on the q and k heads of a fused [B, T, W] (or [B, W])
    projection, in float64 with the given fp32 table's cos and sin; v passes through. Returns the
    result and the elementwise error scale |x cos| + |rotate_half(x) sin| of the rotated part."""
    two_d = x.dim() == 2
    if two_d:
        x = x[:, None]
    b, t, w = x.shape
    d = table.shape[1]
    heads = x.double().reshape(b, t, w // d, d)
    cos = table.double()[pos0:pos0 + t, :d // 2].repeat(1, 2)[None, :, None]
    sin = table.double()[pos0:pos0 + t, d // 2:].repeat(1, 2)[None, :, None]
    rot = n_head + n_kv_head
    q = heads[:, :, :rot]
    out = torch.cat([q * cos + rotate_half(q) * sin, heads[:, :, rot:]], dim=2)
    scale = torch.cat([q.abs() * cos.abs() + rotate_half(q).abs() * sin.abs(),
                       heads[:, :, rot:].abs()], dim=2)
    out, scale = out.reshape(b, t, w), scale.reshape(b, t, w)
    return (out[:, 0], scale[:, 0]) if two_d else (out, scale)


LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA32_SCALING = dict(LLAMA31_SCALING, factor=32.0)


def rope_table_meta(theta, scaling):
    meta = {"theta": repr(theta)}
    if scaling is not None:
        meta["scaling"] = scaling["rope_type"]
        meta["factor"] = repr(scaling["factor"])
        if scaling["rope_type"] == "llama3":
            meta["low_freq_factor"] = repr(scaling["low_freq_factor"])
            meta["high_freq_factor"] = repr(scaling["high_freq_factor"])
            meta["original_max_position"] = scaling["original_max_position_embeddings"]
    return meta


def rope_table_ref(positions, head_dim, theta, scaling=None):
    """(cos | sin) rows in float64 for positions 0 .. positions - 1, and the angles."""
    angle = torch.arange(positions, dtype=torch.float64)[:, None] * \
        rope_inv_freq_ref(head_dim, theta, scaling)[None]
    return torch.cat([angle.cos(), angle.sin()], dim=-1), angle


class Rope(OpTest):
    # (name, head_dim, theta, scaling, positions): GPT-NeoX / Llama 2 defaults, Qwen2.5's
    # theta, Llama 3.1 (8B: D = 128, theta 5e5, factor 8) and Llama 3.2 (factor 32), a linear
    # scaling, and a head size that is not a multiple of 32.
    TABLES = [("default", 64, 10000.0, None, 300), ("qwen2", 64, 1e6, None, 100),
              ("llama3.1", 128, 500000.0, LLAMA31_SCALING, 4096),
              ("llama3.2", 64, 500000.0, LLAMA32_SCALING, 200),
              ("linear", 32, 10000.0, {"rope_type": "linear", "factor": 4.0}, 50),
              ("d12", 12, 10000.0, None, 40)]

    def test_rope_table(self):
        # inv_freq: computed in double and rounded once (half an ulp; one allowed). The table:
        # the angle t * f is the fp32 product of the fp32 frequency (each half an ulp), so it errs
        # by up to 2^-23 of itself, which cos and sin pass on; then their own rounding.
        cases = []
        for name, d, theta, scaling, positions in self.TABLES:
            inv_freq = rope_inv_freq_ref(d, theta, scaling)
            want, angle = rope_table_ref(positions, d, theta, scaling)
            meta = dict(rope_table_meta(theta, scaling), head_dim=d, positions=positions)
            cases.append(Case("rope_table", name, {}, meta)
                         .check("inv_freq", inv_freq, Tol(ULP[F32], 0))
                         .check("table", want, Tol(ULP[F32], 2.0**-22), angle.repeat(1, 2)))
        self.run_and_check(cases)

    # (B, T, n_head, n_kv_head, D, table, pos0): GQA 2:1, MQA, MHA, T = 1 at a decoding
    # offset, Llama 3.1's table at positions past its original 8192 / factor band edges, and
    # [B, W] single tokens (T = None).
    SHAPES = [(3, 5, 4, 2, 12, "d12", 0), (2, 7, 6, 1, 64, "default", 3),
              (2, 9, 3, 3, 64, "qwen2", 0), (3, 1, 4, 2, 64, "default", 250),
              (2, 33, 8, 2, 128, "llama3.1", 4000), (3, None, 4, 1, 32, "linear", 49),
              (2, None, 2, 2, 12, "d12", 0)]
    # fp32: x c - x' s with fp32 products and one fma: within 2^-23 of the magnitudes of its
    # terms (scale), plus the rounding. 16-bit: one rounding to the dtype.
    TOL = {F32: Tol(ULP[F32], 2.0**-23), BF16: Tol(ULP[BF16], 2.0**-23),
           F16: Tol(ULP[F16], 2.0**-23)}

    def tables(self):
        return {name: rope_table_ref(positions, d, theta, scaling)[0].float()
                for name, d, theta, scaling, positions in self.TABLES}

    def test_rope(self):
        tables = self.tables()
        cases = []
        for dt in FLOATS:
            for b, t, nh, nkv, d, table_name, pos0 in self.SHAPES:
                name = f"{SHORT[dt]}/b{b}t{t}h{nh}kv{nkv}d{d}/{table_name}/pos{pos0}"
                g = generator(name)
                w = (nh + 2 * nkv) * d
                shape = (b, w) if t is None else (b, t, w)
                x = randn(g, shape, dt, 2.0)
                dy = randn(g, shape, dt)
                table = tables[table_name]
                x64 = x.double().requires_grad_()
                y, scale = rope_ref(x64, table, nh, nkv, pos0)
                (dx,) = torch.autograd.grad(y, x64, dy.double())
                _, dscale = rope_ref(dy, table, nh, nkv, pos0)
                v_cols = (lambda c: lambda z: z[..., c:])((nh + nkv) * d)
                meta = {"n_head": nh, "n_kv_head": nkv, "pos0": pos0}
                for alias in ("none", "x"):
                    cases.append(Case("rope_forward", f"{name}/alias_{alias}",
                                      {"x": x.clone(), "table": table}, dict(meta, alias=alias))
                                 .check("y", y.detach(), self.TOL[dt], scale.detach())
                                 .exact("y", x, select=v_cols, label="y's v columns"))
                    cases.append(Case("rope_backward", f"{name}/alias_{alias}",
                                      {"dy": dy.clone(), "table": table},
                                      dict(meta, alias="dy" if alias == "x" else "none"))
                                 .check("dx", dx, self.TOL[dt], dscale)
                                 .exact("dx", dy, select=v_cols, label="dx's v columns"))
        self.run_and_check(cases)

    def test_rope_round_trip(self):
        # backward is the transpose of forward, and a rotation's transpose is its inverse: the
        # backward of the forward gives x back to fp32 rounding (fp32 cases only).
        tables = self.tables()
        name = "f32/round_trip"
        g = generator(name)
        x = randn(g, (2, 9, (4 + 2 * 2) * 128), F32)
        y, _ = rope_ref(x, tables["llama3.1"], 4, 2, 4000)
        self.run_and_check([Case("rope_backward", name,
                                 {"dy": y.float(), "table": tables["llama3.1"]},
                                 {"n_head": 4, "n_kv_head": 2, "pos0": 4000})
                            .check("dx", x.double(), Tol(4 * ULP[F32], 4 * ULP[F32]))])


# ---- attention -------------------------------------------------------------------------------

def split_qkv(qkv, n_head, n_kv_head):
    """q, k, v as [B, H, T, D] from a fused [B, T, (H + 2 KV) D] projection, with each key/value
    head repeated for the query heads of its group (transformers' repeat_kv)."""
    b, t, w = qkv.shape
    hs = w // (n_head + 2 * n_kv_head)
    q, k, v = qkv.split([n_head * hs, n_kv_head * hs, n_kv_head * hs], dim=-1)
    heads = lambda z, n: z.reshape(b, t, n, hs).transpose(1, 2)
    group = n_head // n_kv_head
    q = heads(q, n_head)
    k, v = (heads(z, n_kv_head).repeat_interleave(group, dim=1) for z in (k, v))
    return q, k, v, hs


def attention_ref(qkv, n_head, n_kv_head=None):
    """Causal softmax attention, naively in float64: (out, lse) on a fused qkv projection
    (GPT-2's [B, T, 3C], or grouped-query [B, T, (H + 2 KV) D])."""
    n_kv_head = n_kv_head or n_head
    b, t, _ = qkv.shape
    q, k, v, hs = split_qkv(qkv, n_head, n_kv_head)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, t, n_head * hs), lse


def attention_grad_scale(qkv, dout, n_head, n_kv_head=None):
    """The magnitudes of the terms that make up dq, dk and dv, elementwise, in qkv's layout: the
    scale of their floating-point error, which the largest result does not give where the
    terms cancel (dq and dk are zero when T = 1). A key/value head's terms sum over its group."""
    n_kv_head = n_kv_head or n_head
    b, t, _ = qkv.shape
    q, k, v, hs = split_qkv(qkv.double().abs(), n_head, n_kv_head)
    qs, ks, vs = split_qkv(qkv.double(), n_head, n_kv_head)[:3]
    do = dout.double().abs().reshape(b, t, n_head, hs).transpose(1, 2)
    scores = (qs @ ks.transpose(-1, -2)) / math.sqrt(hs)
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(scores, dim=-1)
    ds = p * (do @ v.transpose(-1, -2) + (do * (p @ vs).abs()).sum(-1, keepdim=True))
    dq = ds @ k / math.sqrt(hs)
    dk = ds.transpose(-1, -2) @ q / math.sqrt(hs)
    dv = p.transpose(-1, -2) @ do
    group = n_head // n_kv_head
    fold = lambda z: z.reshape(b, n_kv_head, group, t, hs).sum(2)
    merge = lambda z: z.transpose(1, 2).reshape(b, t, -1)
    return torch.cat([merge(dq), merge(fold(dk)), merge(fold(dv))], dim=-1)


class Attention(OpTest):
    # (B, T, C, n_head): head sizes 12, 18, 13, 16, 48; T = 1; T not a multiple of 8.
    SHAPES = [(3, 5, 36, 3), (1, 1, 36, 2), (3, 1, 36, 3), (2, 17, 52, 4), (1, 64, 64, 4),
              (3, 33, 48, 1)]
    # fp32 online softmax: within 1e-5 of the largest output. 16-bit: the probabilities may be
    # rounded to the dtype before the product with v (as flash attention does), so errors
    # reach a few units of the dtype's rounding of the largest |v|; lse stays fp32.
    OUT_TOL = {F32: Tol(1e-5, 1e-5), BF16: Tol(2**-7, 2**-7), F16: Tol(2**-10, 2**-10)}
    LSE_TOL = {F32: Tol(1e-5, 1e-5), BF16: Tol(1e-4, 1e-4), F16: Tol(1e-4, 1e-4)}
    # Backward: relative to the largest magnitude of the terms of dq, dk or dv
    # (attention_grad_scale; per element it would be too strict where fp16 probabilities are
    # subnormal). 16-bit rounds P and dS to the dtype for its products: about 1e-2 for bf16
    # (8 bits), 2^-8 for fp16 (11 bits).
    GRAD_TOL = {F32: Tol(1e-5, 1e-5), BF16: Tol(1e-2, 1e-2), F16: Tol(2**-8, 2**-8)}

    def make(self, dt, shape):
        b, t, c, nh = shape
        name = f"{SHORT[dt]}/b{b}t{t}c{c}h{nh}"
        g = generator(name)
        # Larger q and k than unit variance make the softmax rows peaky, as trained models do.
        qkv = torch.cat([randn(g, (b, t, c), dt, 2.0), randn(g, (b, t, c), dt, 2.0),
                         randn(g, (b, t, c), dt)], dim=-1)
        return name, g, qkv

    def test_attention_forward(self):
        cases = []
        for dt in FLOATS:
            for shape in self.SHAPES:
                name, _, qkv = self.make(dt, shape)
                out, lse = attention_ref(qkv.double(), shape[3])
                cases.append(Case("attention_forward", name, {"qkv": qkv}, {"n_head": shape[3]})
                             .check("out", out, self.OUT_TOL[dt])
                             .check("lse", lse, self.LSE_TOL[dt]))
        self.run_and_check(cases)

    def test_attention_backward(self):
        cases = []
        for dt in FLOATS:
            for shape in self.SHAPES:
                name, g, qkv = self.make(dt, shape)
                c = shape[2]
                qkv64 = qkv.double().requires_grad_()
                out, lse = attention_ref(qkv64, shape[3])
                dout = randn(g, out.shape, dt)
                (dqkv,) = torch.autograd.grad(out, qkv64, dout.double())
                case = Case("attention_backward", name,
                            {"qkv": qkv, "dout": dout, "out": out.detach().to(dt),
                             "lse": lse.detach().float()}, {"n_head": shape[3]})
                scale = attention_grad_scale(qkv, dout, shape[3])
                for i, part in enumerate("qkv"):
                    sl = (lambda i, c: lambda t: t[..., i * c:(i + 1) * c])(i, c)
                    case.check("dqkv", dqkv, self.GRAD_TOL[dt], sl(scale).max(), select=sl,
                               label=f"d{part}")
                cases.append(case)
        self.run_and_check(cases)


    def test_attention_decode(self):
        # One query against a KV cache: the forward's tolerances. The cache gets the token's k
        # and v in row pos and keeps every other row bit for bit (rows after pos hold values
        # that would change out if they were read).
        cases = []
        for dt in FLOATS:
            for (b, c, nh, t_max, pos) in [(3, 36, 3, 8, 4), (1, 36, 2, 4, 0), (2, 52, 4, 17, 16),
                                           (3, 48, 1, 40, 32)]:
                name = f"{SHORT[dt]}/b{b}c{c}h{nh}/pos{pos}of{t_max}"
                g = generator(name)
                qkv = torch.cat([randn(g, (b, c), dt, 2.0), randn(g, (b, c), dt, 2.0),
                                 randn(g, (b, c), dt)], dim=-1)
                k_cache, v_cache = randn(g, (b, t_max, c), dt, 2.0), randn(g, (b, t_max, c), dt)
                want_k, want_v = k_cache.clone(), v_cache.clone()
                want_k[:, pos], want_v[:, pos] = qkv[:, c:2 * c], qkv[:, 2 * c:]
                # The full causal attention over positions 0..pos; its last row is the decode.
                seq = torch.cat([torch.zeros(b, pos + 1, c, dtype=dt), want_k[:, :pos + 1],
                                 want_v[:, :pos + 1]], dim=-1)
                seq[:, pos, :c] = qkv[:, :c]
                out, _ = attention_ref(seq.double(), nh)
                cases.append(Case("attention_decode", name,
                                  {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache},
                                  {"pos": pos, "n_head": nh})
                             .check("out", out[:, pos], self.OUT_TOL[dt])
                             .exact("k_cache", want_k)
                             .exact("v_cache", want_v))
        self.run_and_check(cases)

    # Grouped-query attention: (B, T, n_head, n_kv_head, head size): groups of 2, 3 and 4, MQA
    # (one key/value head), MHA through the five-argument overloads, T = 1, and T = 300 (more
    # than one key block and query chunk). B * n_kv_head of 1 and 2 takes the CPU's split
    # backward, the others its one sweep per key/value head.
    GQA_SHAPES = [(3, 5, 4, 2, 12), (2, 17, 6, 2, 8), (1, 64, 8, 1, 16), (2, 33, 3, 3, 16),
                  (3, 1, 4, 2, 12), (1, 300, 4, 1, 16), (2, 70, 8, 2, 32)]

    def make_gqa(self, dt, shape):
        b, t, nh, nkv, hs = shape
        name = f"{SHORT[dt]}/b{b}t{t}h{nh}kv{nkv}d{hs}"
        g = generator(name)
        qkv = torch.cat([randn(g, (b, t, (nh + nkv) * hs), dt, 2.0),
                         randn(g, (b, t, nkv * hs), dt)], dim=-1)
        return name, g, qkv

    def test_gqa_attention_forward(self):
        cases = []
        for dt in FLOATS:
            for shape in self.GQA_SHAPES:
                name, _, qkv = self.make_gqa(dt, shape)
                out, lse = attention_ref(qkv.double(), shape[2], shape[3])
                cases.append(Case("attention_forward", f"gqa/{name}", {"qkv": qkv},
                                  {"n_head": shape[2], "n_kv_head": shape[3]})
                             .check("out", out, self.OUT_TOL[dt])
                             .check("lse", lse, self.LSE_TOL[dt]))
        self.run_and_check(cases)

    def test_gqa_attention_backward(self):
        cases = []
        for dt in FLOATS:
            for shape in self.GQA_SHAPES:
                name, g, qkv = self.make_gqa(dt, shape)
                _, _, nh, nkv, hs = shape
                qkv64 = qkv.double().requires_grad_()
                out, lse = attention_ref(qkv64, nh, nkv)
                dout = randn(g, out.shape, dt)
                (dqkv,) = torch.autograd.grad(out, qkv64, dout.double())
                case = Case("attention_backward", f"gqa/{name}",
                            {"qkv": qkv, "dout": dout, "out": out.detach().to(dt),
                             "lse": lse.detach().float()}, {"n_head": nh, "n_kv_head": nkv})
                scale = attention_grad_scale(qkv, dout, nh, nkv)
                bounds = [0, nh * hs, (nh + nkv) * hs, (nh + 2 * nkv) * hs]
                for i, part in enumerate("qkv"):
                    sl = (lambda lo, hi: lambda t: t[..., lo:hi])(bounds[i], bounds[i + 1])
                    case.check("dqkv", dqkv, self.GRAD_TOL[dt], sl(scale).max(), select=sl,
                               label=f"d{part}")
                cases.append(case)
        self.run_and_check(cases)

    def test_gqa_attention_decode(self):
        # The caches hold only the key/value heads; as test_attention_decode otherwise.
        cases = []
        for dt in FLOATS:
            for (b, nh, nkv, hs, t_max, pos) in [(3, 4, 2, 12, 8, 4), (1, 6, 1, 16, 4, 0),
                                                 (2, 8, 2, 32, 17, 16), (2, 3, 3, 16, 9, 5)]:
                name = f"gqa/{SHORT[dt]}/b{b}h{nh}kv{nkv}d{hs}/pos{pos}of{t_max}"
                g = generator(name)
                qw, kvw = nh * hs, nkv * hs
                qkv = torch.cat([randn(g, (b, qw + kvw), dt, 2.0), randn(g, (b, kvw), dt)], dim=-1)
                k_cache, v_cache = randn(g, (b, t_max, kvw), dt, 2.0), randn(g, (b, t_max, kvw), dt)
                want_k, want_v = k_cache.clone(), v_cache.clone()
                want_k[:, pos], want_v[:, pos] = qkv[:, qw:qw + kvw], qkv[:, qw + kvw:]
                seq = torch.cat([torch.zeros(b, pos + 1, qw, dtype=dt), want_k[:, :pos + 1],
                                 want_v[:, :pos + 1]], dim=-1)
                seq[:, pos, :qw] = qkv[:, :qw]
                out, _ = attention_ref(seq.double(), nh, nkv)
                cases.append(Case("attention_decode", name,
                                  {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache},
                                  {"pos": pos, "n_head": nh, "n_kv_head": nkv})
                             .check("out", out[:, pos], self.OUT_TOL[dt])
                             .exact("k_cache", want_k)
                             .exact("v_cache", want_v))
        self.run_and_check(cases)


# ---- embedding -------------------------------------------------------------------------------

class Embedding(OpTest):
    # (B, T, T_max, V, C)
    SHAPES = [(3, 5, 8, 50, 36), (3, 1, 4, 50, 13), (2, 7, 7, 50257, 13), (4, 64, 64, 50, 130)]

    def tokens(self, g, b, t, v):
        tokens = torch.randint(0, v, (b, t), generator=g, dtype=I32)
        # Duplicates within the batch, and the first and last ids of the vocabulary.
        tokens.view(-1)[-1] = tokens.view(-1)[0]
        if tokens.numel() > 2:
            tokens.view(-1)[1] = v - 1
            tokens.view(-1)[-2] = 0
        return tokens

    def test_embedding_forward(self):
        # A copy is exact; with positions, one fp32 addition then one rounding to the dtype.
        tol = ROUNDED
        cases = []
        for dt in FLOATS:
            for (b, t, tmax, v, c) in self.SHAPES:
                for with_wpe in (True, False):
                    name = f"{SHORT[dt]}/b{b}t{t}v{v}c{c}/wpe{int(with_wpe)}"
                    g = generator(name)
                    tokens = self.tokens(g, b, t, v)
                    wte, wpe = randn(g, (v, c), dt), randn(g, (tmax, c), dt, 0.3)
                    inputs = {"tokens": tokens, "wte": wte}
                    case = Case("embedding_forward", name, inputs)
                    want = wte.double()[tokens.long()]
                    if with_wpe:
                        inputs["wpe"] = wpe
                        case.check("out", want + wpe.double()[:t], tol[dt])
                    else:
                        case.exact("out", wte[tokens.long()])
                    cases.append(case)
        self.run_and_check(cases)

    def test_embedding_backward(self):
        # fp32 scatter-add of at most 256 rows: within 1e-5 of the sum of magnitudes.
        tol = Tol(ULP[F32], 1e-5)
        cases = []
        for dt in FLOATS:
            for (b, t, tmax, v, c) in self.SHAPES + [(3, 5, 8, 7, 36)]:  # V=7: many duplicates
                for with_wpe in (True, False):
                    name = f"{SHORT[dt]}/b{b}t{t}v{v}c{c}/wpe{int(with_wpe)}"
                    g = generator(name)
                    tokens = self.tokens(g, b, t, v)
                    dout = randn(g, (b, t, c), dt)
                    dwte, dwpe = randn(g, (v, c), F32), randn(g, (tmax, c), F32)
                    flat, ids = dout.double().reshape(-1, c), tokens.long().flatten()
                    want = dwte.double().index_add(0, ids, flat)
                    scale = dwte.double().abs().index_add(0, ids, flat.abs())
                    inputs = {"tokens": tokens, "dout": dout, "dwte": dwte}
                    case = Case("embedding_backward", name, inputs).check("dwte", want, tol, scale)
                    if with_wpe:
                        inputs["dwpe"] = dwpe
                        want_pe, scale_pe = dwpe.double().clone(), dwpe.double().abs()
                        want_pe[:t] += dout.double().sum(0)
                        scale_pe[:t] += dout.double().abs().sum(0)
                        case.check("dwpe", want_pe, tol, scale_pe)
                    cases.append(case)
        self.run_and_check(cases)


# ---- cross-entropy ---------------------------------------------------------------------------

class CrossEntropy(OpTest):
    # (N rows, vocab, padded vocab, logit std)
    SHAPES = [(15, 50257, 50304, 2.0), (1, 50257, 50304, 2.0), (15, 13, 16, 2.0),
              (6, 36, 36, 2.0), (15, 50257, 50304, 20.0)]
    # Padded columns hold a value that would dominate the softmax if it were read.
    PAD = 30000.0
    # losses and lse are fp32 from exact inputs whatever the logits' dtype: the fp32 sum of
    # up to 50257 exponentials is good to about 1e-5 relative, so lse (and the loss, a
    # difference of log-domain values) is good to about 1e-5 absolute; scale 1 makes of_scale
    # absolute.
    LOSS_TOL = Tol(1e-6, 3e-5)

    def make(self, dt, shape):
        n, v, vp, std = shape
        name = f"{SHORT[dt]}/n{n}v{v}vp{vp}/std{std}"
        g = generator(name)
        logits = randn(g, (n, vp), F32, std)
        logits[:, v:] = self.PAD
        logits = logits.to(dt)
        targets = torch.randint(0, v, (n,), generator=g, dtype=I32)
        targets[0] = v - 1
        if n > 7:
            targets[2], targets[7] = -1, -100  # ignored positions
        return name, g, logits, targets

    def reference(self, logits, targets, v):
        z = logits.double()[:, :v]
        lse = torch.logsumexp(z, dim=-1)
        counted = targets >= 0
        safe = targets.clamp_min(0).long()
        losses = torch.where(counted, lse - z.gather(1, safe[:, None])[:, 0],
                             torch.zeros_like(lse))
        return losses, lse, counted

    def test_cross_entropy_forward(self):
        cases = []
        for dt in FLOATS:
            for shape in self.SHAPES:
                name, _, logits, targets = self.make(dt, shape)
                losses, lse, counted = self.reference(logits, targets, shape[1])
                rows = (lambda m: lambda t: t[m])(counted)
                ignored = (lambda m: lambda t: t[m])(~counted)
                cases.append(Case("cross_entropy_forward", name,
                                  {"logits": logits, "targets": targets}, {"vocab": shape[1]})
                             .check("losses", losses, self.LOSS_TOL, 1.0, select=rows)
                             .exact("losses", losses.float(), select=ignored,
                                    label="losses of ignored rows")
                             .check("lse", lse, self.LOSS_TOL, 1.0, select=rows))
        self.run_and_check(cases)

    def test_cross_entropy_backward(self):
        # softmax - onehot from an fp32 lse: p = exp(z - lse) is good to 1e-5 relative in fp32;
        # 16-bit adds a rounding (1 ulp allows for both). of_scale covers the rows' cancellation
        # at the target column. Padded columns and ignored rows must be exactly zero.
        tol = {F32: Tol(1e-5, 1e-7), BF16: Tol(ULP[BF16], 1e-7), F16: Tol(ULP[F16], 1e-7)}
        cases = []
        for dt in FLOATS:
            for shape in self.SHAPES:
                for alias in ("none", "logits"):
                    name, _, logits, targets = self.make(dt, shape)
                    v = shape[1]
                    _, lse, counted = self.reference(logits, targets, v)
                    count = int(counted.sum())
                    # fp16 training multiplies by a loss scale; keep the gradients normal.
                    dloss = f32((1024.0 if dt == F16 else 1.0) / count)
                    z = logits.double()
                    p = torch.softmax(z[:, :v], dim=-1)
                    p[torch.arange(len(targets))[counted], targets[counted].long()] -= 1.0
                    want = torch.zeros_like(z)
                    want[:, :v] = p * dloss
                    want[~counted] = 0.0
                    padded = lambda t, v=v: t[:, v:]
                    ignored = (lambda m: lambda t: t[m])(~counted)
                    cases.append(Case("cross_entropy_backward", f"{name}/alias_{alias}",
                                      {"logits": logits, "targets": targets, "lse": lse.float()},
                                      {"vocab": v, "dloss": repr(dloss), "alias": alias})
                                 .check("dlogits", want, tol[dt])
                                 .exact("dlogits", want.to(dt), select=padded,
                                        label="dlogits padded columns")
                                 .exact("dlogits", want.to(dt), select=ignored,
                                        label="dlogits ignored rows"))
        self.run_and_check(cases)


# ---- optimizer and norms ---------------------------------------------------------------------

class Optimizer(OpTest):
    def test_adamw_update(self):
        # Against torch.optim.AdamW in float64 over several steps. fp32 master: each step
        # rounds the weight once (2^-24 relative) and the update errs by about 1e-7 of lr;
        # four steps stay within 1e-6 relative. m and v: within 1e-5 relative (v) and of the
        # largest |m| (m cancels). The 16-bit copy: the rounding of the master, which may fall
        # on the other side of a rounding boundary than the float64 master's (1 ulp).
        master_tol, moment_tol = Tol(1e-6, 1e-7), Tol(1e-5, 1e-6)
        param_tol = {BF16: Tol(ULP[BF16], 0), F16: Tol(ULP[F16], 0)}
        cases = []
        configs = [
            # (shape, param dtype, first step, grad_scale, weight_decay, steps)
            ((37, 29), None, 1, 1.0, 0.1, 4),
            ((37, 29), BF16, 1, 1.0, 0.1, 4),
            ((37, 29), F16, 1, 0.25, 0.0, 3),
            ((13,), BF16, 10, 1.0, 0.1, 2),  # resumed: m, v and the step carry over
            ((50003,), BF16, 1, 0.5, 0.01, 3),
        ]
        for shape, param_dt, first_step, grad_scale, wd, steps in configs:
            name = (f"{'x'.join(map(str, shape))}/param_{SHORT.get(param_dt, 'none')}/"
                    f"step{first_step}/gs{grad_scale}/wd{wd}")
            g = generator(name)
            lr, beta1, beta2, eps = f32(1e-3), f32(0.9), f32(0.95), f32(1e-8)
            master = randn(g, shape, F32, 0.5)
            grads = randn(g, (steps,) + shape, F32, 0.1)
            if first_step > 1:
                m = randn(g, shape, F32, 0.01)
                v = (randn(g, shape, F32, 1e-2) ** 2).float()
            else:
                m, v = torch.zeros(shape), torch.zeros(shape)
            p = torch.nn.Parameter(master.double().clone())
            opt = torch.optim.AdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=f32(wd))
            if first_step > 1:
                opt.state[p] = {"step": torch.tensor(float(first_step - 1)),
                                "exp_avg": m.double().clone(), "exp_avg_sq": v.double().clone()}
            for s in range(steps):
                p.grad = grads[s].double() * f32(grad_scale)
                opt.step()
            state = opt.state[p]
            inputs = {"master": master, "m": m, "v": v, "grads": grads.reshape(steps, -1)}
            case = Case("adamw_update", name, inputs,
                        {"lr": repr(lr), "beta1": repr(beta1), "beta2": repr(beta2),
                         "eps": repr(eps), "weight_decay": repr(f32(wd)),
                         "grad_scale": repr(f32(grad_scale)), "first_step": first_step})
            case.check("master", p.detach(), master_tol)
            case.check("m", state["exp_avg"], moment_tol)
            case.check("v", state["exp_avg_sq"], moment_tol)
            if param_dt is not None:
                inputs["param"] = randn(g, shape, param_dt)
                case.check("param", p.detach().to(param_dt), param_tol[param_dt])
            cases.append(case)
        self.run_and_check(cases)

    def test_norms(self):
        # Squares summed in fp32 runs of 256, runs in fp64: within 1e-5 relative (the terms
        # are positive, so relative to the result). clip_grad_norm scales by an fp32 factor:
        # two roundings of up to half an ulp each, and one more ulp of margin.
        sum_tol, scaled_tol = Tol(1e-5, 0), Tol(2 * ULP[F32], 0)
        cases = []
        for dt in FLOATS:
            for shape in [(1,), (13,), (3, 5, 36), (100003,)]:
                name = f"{SHORT[dt]}/{'x'.join(map(str, shape))}"
                x = randn(generator(name), shape, dt, 3.0)
                cases.append(Case("sum_of_squares", name, {"x": x})
                             .check("result", (x.double() ** 2).sum().item(), sum_tol))
            if dt != F16:
                # Finite elements whose squares overflow fp32 still have a finite sum in fp64.
                x = randn(generator(f"{SHORT[dt]}/huge"), (3, 5, 36), dt)
                x[0, 1, 2], x[2, 4, 35] = 1e20, -3e19
                cases.append(Case("sum_of_squares", f"{SHORT[dt]}/huge", {"x": x})
                             .check("result", (x.double() ** 2).sum().item(), sum_tol))
            for bad in (math.inf, math.nan):
                x = randn(generator(f"{SHORT[dt]}/{bad}"), (3, 5, 36), dt)
                x[1, 2, 3] = bad
                cases.append(Case("sum_of_squares", f"{SHORT[dt]}/with_{bad}", {"x": x})
                             .exact("result", bad))
        g = generator("global_norm")
        tensors = [randn(g, (3, 5, 36), F32), randn(g, (13,), BF16), randn(g, (100003,), F16, 0.1)]
        norm = math.sqrt(sum((t.double() ** 2).sum().item() for t in tensors))
        cases.append(Case("global_norm", "mixed", {f"t{i}": t for i, t in enumerate(tensors)})
                     .check("result", norm, sum_tol))
        for ratio in (0.5, 2.0):
            name = f"clip/max_norm_{ratio}x"
            g = generator(name)
            grads = [randn(g, (37, 29), F32), randn(g, (13,), F32), randn(g, (3, 5, 36), F32, 3.0)]
            norm = math.sqrt(sum((t.double() ** 2).sum().item() for t in grads))
            params = [torch.nn.Parameter(torch.zeros(t.shape, dtype=torch.float64)) for t in grads]
            for p, t in zip(params, grads):
                p.grad = t.double().clone()
            total = torch.nn.utils.clip_grad_norm_(params, max_norm=ratio * norm).item()
            case = Case("clip_grad_norm", name, {f"t{i}": t for i, t in enumerate(grads)},
                        {"max_norm": repr(ratio * norm)}).check("result", total, sum_tol)
            for i, p in enumerate(params):
                case.check(f"t{i}", p.grad, scaled_tol)
            cases.append(case)
        # A non-finite norm is returned and nothing is scaled.
        g = generator("clip/inf")
        grads = [randn(g, (13,), F32), randn(g, (3, 5, 36), F32)]
        grads[1][2, 1, 0] = math.inf
        case = Case("clip_grad_norm", "with_inf", {f"t{i}": t for i, t in enumerate(grads)},
                    {"max_norm": "1.0"}).exact("result", math.inf)
        for i, t in enumerate(grads):
            case.exact(f"t{i}", t)
        cases.append(case)
        self.run_and_check(cases)


class ThreadCount(unittest.TestCase):
    """The CPU kernels cut their work into chunks that do not depend on the thread count and
    reduce in chunk order (runtime/cpu/parallel.hpp), so 1 and 3 threads give the same bits.
    matmul (oneDNN) and attention make no such promise and are not checked here."""

    def test_results_do_not_depend_on_thread_count(self):
        if OPTIONS.device != "cpu":
            self.skipTest("thread counts apply to the CPU backend")
        g = generator("threads")
        x = randn(g, (4, 64, 130), BF16)
        tokens = torch.randint(0, 50, (4, 64), generator=g, dtype=I32)
        logits = randn(g, (15, 50304), F32, 2.0)
        targets = torch.randint(0, 50257, (15,), generator=g, dtype=I32)
        cases = [
            Case("add", "", {"a": x, "b": randn(g, x.shape, BF16)}),
            Case("gelu_backward", "", {"x": x, "dy": randn(g, x.shape, BF16)}),
            Case("convert", "", {"src": randn(g, (70000,), F32)}, {"dtype": "bf16"}),
            Case("scale_", "", {"x": randn(g, (100003,), F16)}, {"alpha": "0.37"}),
            Case("bias_backward", "", {"dy": randn(g, (1000, 50), BF16),
                                       "dbias": randn(g, (50,), F32)}),
            Case("layernorm_forward", "", {"x": x, "weight": randn(g, (130,), BF16),
                                           "bias": randn(g, (130,), BF16)}, {"eps": "1e-5"}),
            Case("layernorm_backward", "", {
                "x": x, "dy": randn(g, x.shape, BF16), "weight": randn(g, (130,), BF16),
                "mean": randn(g, (4, 64), F32), "rstd": randn(g, (4, 64), F32, 0.1, 1.0),
                "dweight": randn(g, (130,), F32), "dbias": randn(g, (130,), F32)}),
            Case("embedding_forward", "", {"tokens": tokens, "wte": randn(g, (50, 130), BF16),
                                           "wpe": randn(g, (64, 130), BF16)}),
            Case("embedding_backward", "", {"tokens": tokens, "dout": x,
                                            "dwte": randn(g, (50, 130), F32),
                                            "dwpe": randn(g, (64, 130), F32)}),
            Case("cross_entropy_forward", "", {"logits": logits, "targets": targets},
                 {"vocab": 50257}),
            Case("cross_entropy_backward", "", {"logits": logits, "targets": targets,
                                                "lse": randn(g, (15,), F32, 1.0, 11.0)},
                 {"vocab": 50257, "dloss": "0.1"}),
            Case("adamw_update", "", {"master": randn(g, (50003,), F32),
                                      "m": randn(g, (50003,), F32, 0.01),
                                      "v": randn(g, (50003,), F32, 0.01) ** 2,
                                      "grads": randn(g, (2, 50003), F32),
                                      "param": randn(g, (50003,), BF16)},
                 {"lr": "1e-3", "beta1": "0.9", "beta2": "0.95", "eps": "1e-8",
                  "weight_decay": "0.1", "grad_scale": "1", "first_step": 3}),
            Case("sum_of_squares", "", {"x": randn(g, (100003,), BF16)}),
            Case("rmsnorm_forward", "", {"x": x, "weight": randn(g, (130,), BF16)},
                 {"eps": "1e-6"}),
            Case("rmsnorm_backward", "", {
                "x": x, "dy": randn(g, x.shape, BF16), "weight": randn(g, (130,), BF16),
                "rstd": randn(g, (4, 64), F32, 0.1, 1.0), "dweight": randn(g, (130,), F32)}),
            Case("swiglu_forward", "", {"x": x}),
            Case("swiglu_backward", "", {"x": x, "dy": randn(g, (4, 64, 65), BF16)}),
            Case("rope_forward", "", {"x": randn(g, (4, 64, 8 * 32), BF16),
                                      "table": randn(g, (70, 32), F32)},
                 {"n_head": 4, "n_kv_head": 2, "pos0": 3}),
        ]
        one, three = run_cases(cases, threads=1), run_cases(cases, threads=3)
        for case, (t1, m1), (t3, m3) in zip(cases, one, three):
            with self.subTest(op=case.op):
                self.assertNotIn("error", m1)
                self.assertEqual(m1, m3, f"{case.op}: scalar results differ")
                self.assertEqual(sorted(t1), sorted(t3))
                for name in t1:
                    msg, _ = compare(case, f"{name} with 3 threads vs 1", t3[name], t1[name],
                                     EXACT, None)
                    if msg:
                        self.fail(msg)


def print_stats():
    if not STATS:
        return
    print("\nworst error / allowed, per op (1.0 would fail):", file=sys.stderr)
    for op, (n, worst, where) in sorted(STATS.items()):
        print(f"  {op:24s} {n:4d} cases  {worst:7.3f}  {where}", file=sys.stderr)


SKIPPED = 77


def probe_device(runner, device):
    """op_runner's error opening the device, or "" when it can (no case runs: empty input)."""
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([runner, "--device", device, "--in", tmp, "--out", tmp + "/out"],
                              capture_output=True, text=True)
        return "" if done.returncode == 0 else done.stderr.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runner", required=True, help="path of the op_runner executable")
    parser.add_argument("--device", default="cpu", help="device to run the ops on (cpu, cuda)")
    args, rest = parser.parse_known_args()
    OPTIONS.runner, OPTIONS.device = args.runner, args.device
    if args.device != "cpu":
        probe = probe_device(args.runner, args.device)
        if "no CUDA device" in probe:
            # A GPU test with no GPU reports skipped (ctest's SKIP_RETURN_CODE), never passed.
            print(f"skipped: {probe}", file=sys.stderr)
            sys.exit(SKIPPED)
        if probe:
            sys.exit(f"op_runner cannot open device '{args.device}': {probe}")
    torch.set_num_threads(1)
    program = unittest.main(argv=[sys.argv[0]] + rest, exit=False, verbosity=2)
    print_stats()
    sys.exit(0 if program.result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
