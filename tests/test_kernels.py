"""Packed-weight kernels: torch reference == dequantize-then-matmul exactly; Triton ≈ reference.

The torch reference, the layout and ``swap_linears`` need no triton; the tests of the Triton
kernels are marked ``needs("triton")`` (skipped without it, failed under ``CI=true``).
The Triton kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` is set
here, before triton is imported).  Shapes are small: the interpreter runs every program in
Python.  Row lengths are 3 groups (96, 192, 384: multiples of the group, not of 128/256) and
the output features odd, so every tile edge is masked.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from autobits.formats import get_format  # noqa: E402
from autobits.packed_layout import (  # noqa: E402
    KernelError,
    PackedCheckpoint,
    PackedWeight,
    pack_weight,
    BITS, GROUPS, FloatWeight, join_blocks, parse_packed_format, split_blocks,
)
from autobits.kernels.reference import dequantize_weight, quant_matmul_ref, unpack_codes  # noqa: E402

from autobits.kernels import quant_linear as ql  # noqa: E402

#: The Triton kernel tests: the 'triton' extra (pip install -e '.[triton]').
needs_triton = pytest.mark.needs("triton")

FORMATS = [(b, g) for b in BITS for g in GROUPS]
N_OUT = 19  # odd: masked rows in every tile


def _ids(p):
    return f"INT{p[0]}_G{p[1]}"


def _weight(bits: int, group: int, n: int = N_OUT, k: int | None = None, seed: int = 0):
    k = 3 * group if k is None else k
    g = torch.Generator().manual_seed(seed * 1000 + bits * 10 + group)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, 5] += 0.4  # an outlier channel widens some groups' ranges
    return w, pack_weight(w, f"INT{bits}_G{group}", name="blk.0.attn_q.weight")


def _x(m: int, k: int, seed: int = 1, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _call(fn, x, pw: PackedWeight, **kw):
    return fn(x, pw.codes, pw.scales, pw.zeros, bits=pw.bits, group=pw.group, **kw)


# ------------------------------------------------------------- layout and reference
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_reference_equals_dequantize_then_matmul(fmt):
    bits, group = fmt
    w, pw = _weight(bits, group)
    name = f"INT{bits}_G{group}"
    data = get_format(name).quantize(w.numpy())
    # the split arrays re-interleave to the format's exact bytes
    assert np.array_equal(join_blocks(pw.codes.numpy(), pw.scales.numpy(), pw.zeros.numpy(),
                                      bits=bits, group=group), data)
    deq = torch.from_numpy(get_format(name).dequantize(data, tuple(w.shape)))
    assert torch.equal(dequantize_weight(pw), deq)
    bias = torch.randn(N_OUT)
    for m in (1, 17):
        x = _x(m, w.shape[1])
        assert torch.equal(_call(quant_matmul_ref, x, pw), F.linear(x, deq))
        assert torch.equal(_call(quant_matmul_ref, x, pw, bias=bias), F.linear(x, deq, bias))


@pytest.mark.parametrize("bits", BITS)
def test_unpack_codes_matches_format_codes(bits):
    from autobits.formats.packed import unpack_codes as np_unpack

    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (5, 96), dtype=np.uint8)
    from autobits.formats.packed import pack_codes

    packed = np.concatenate([pack_codes(codes[:, i:i + 32], bits) for i in range(0, 96, 32)], axis=1)
    got = unpack_codes(torch.from_numpy(packed), bits=bits, k=96)
    assert torch.equal(got, torch.from_numpy(codes.astype(np.int32)))
    assert np.array_equal(np_unpack(packed[:, : 4 * bits], bits, 32), codes[:, :32])


def test_split_blocks_errors_and_format_names():
    assert parse_packed_format("int3_g64") == (3, 64)
    for bad in ("Q4_K", "INT7_G32", "INT4_G16", "F16"):
        with pytest.raises(KernelError):
            parse_packed_format(bad)
    with pytest.raises(KernelError, match="must be 160 bytes, got 159"):
        split_blocks(np.zeros(159, np.uint8), bits=4, group=32, shape=(4, 64))


# ------------------------------------------------------------------ Triton kernels
@pytest.fixture(scope="module")
def tk():
    from autobits.kernels import triton_kernels

    return triton_kernels


@needs_triton
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("fmt", FORMATS, ids=_ids)
def test_kernel_matches_reference(tk, fmt, m):
    """``path="auto"``: M=1 runs the GEMV kernel, M=17 the GEMM kernel."""
    bits, group = fmt
    w, pw = _weight(bits, group)
    x = _x(m, w.shape[1])
    got = _call(tk.quant_matmul, x, pw)
    want = _call(quant_matmul_ref, x, pw)
    assert got.shape == (m, N_OUT) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)


@needs_triton
@pytest.mark.parametrize("fmt", [(3, 32), (5, 64), (6, 128), (4, 32)], ids=_ids)
def test_both_paths_any_batch_split_k_and_bias(tk, fmt):
    bits, group = fmt
    w, pw = _weight(bits, group, n=37, k=3 * group)
    bias = torch.randn(37)
    for m in (1, 17):
        x = _x(m, w.shape[1], seed=m)
        want = _call(quant_matmul_ref, x, pw, bias=bias)
        cases = [("gemv", None), ("gemm", None)]
        if m == 1:  # small explicit tiles: split-K atomics over a ragged K split, masked M/N edges
            cases += [("gemv", {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4}),
                      ("gemm", {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2})]
        for path, config in cases:
            got = _call(tk.quant_matmul, x, pw, bias=bias, path=path, config=config)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4, msg=f"{path} {config} m={m}")


@needs_triton
def test_kernel_half_activations_and_leading_dims(tk):
    w, pw = _weight(4, 64, n=24)
    x = _x(6, w.shape[1]).reshape(2, 3, -1)
    got = _call(tk.quant_matmul, x, pw)
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got, _call(quant_matmul_ref, x, pw), rtol=1e-4, atol=2e-4)
    xh = x[0, :1].to(torch.float16)
    gh = _call(tk.quant_matmul, xh, pw)
    assert gh.dtype == torch.float16
    torch.testing.assert_close(gh.float(), _call(quant_matmul_ref, xh.float(), pw),
                               rtol=1e-2, atol=1e-2)
    empty = _call(tk.quant_matmul, torch.zeros(0, w.shape[1]), pw)
    assert empty.shape == (0, 24)


@needs_triton
def test_kernel_wrapper_errors(tk):
    w, pw = _weight(3, 32, n=8)
    x = _x(2, w.shape[1])
    with pytest.raises(KernelError, match="activations have 95 features"):
        _call(tk.quant_matmul, x[:, :95], pw)
    with pytest.raises(KernelError, match="float16, bfloat16 or float32"):
        _call(tk.quant_matmul, x.to(torch.float64), pw)
    with pytest.raises(KernelError, match="scales must be float16"):
        tk.quant_matmul(x, pw.codes, pw.scales.float(), pw.zeros, bits=3, group=32)
    with pytest.raises(KernelError, match="group 64"):
        tk.quant_matmul(x, pw.codes, pw.scales, pw.zeros, bits=3, group=64)
    with pytest.raises(KernelError, match="bits must be one of"):
        tk.quant_matmul(x, pw.codes, pw.scales, pw.zeros, bits=7, group=32)
    with pytest.raises(KernelError, match="bias must be a float"):
        _call(tk.quant_matmul, x, pw, bias=torch.zeros(9))
    with pytest.raises(KernelError, match="path must be"):
        _call(tk.quant_matmul, x, pw, path="gemmv")


@needs_triton
def test_autotune_configs_from_functions(tk, monkeypatch):
    gemv = tk.gemv_configs(interpret=False)
    gemm = tk.gemm_configs(interpret=False)
    assert len(gemv) == 36 and len(gemm) >= 8
    assert len({tuple(sorted(c.kwargs.items())) for c in gemv}) == len(gemv)
    assert all(c.kwargs["BLOCK_K"] <= 128 for c in gemm)
    # interpreter: one config survives pruning (nothing benchmarked), large tiles for big shapes
    for configs in (tk.gemv_configs(interpret=True), tk.gemm_configs(interpret=True)):
        for shape in ({"N": 19, "K": 96, "M": 1}, {"N": 49152, "K": 576, "M": 6}):
            (best,) = tk._prune(configs, shape)
            assert best.kwargs["BLOCK_N"] * best.kwargs["BLOCK_K"] <= 1 << 20
    (big,) = tk._prune(tk.gemv_configs(interpret=True), {"N": 49152, "K": 576, "M": 1})
    assert big.kwargs["BLOCK_N"] >= 256
    monkeypatch.setattr(tk, "INTERPRET", False)
    kept = tk._prune(gemv, {"N": 24, "K": 96, "M": 1})
    assert kept and all(c.kwargs["BLOCK_N"] <= 32 and c.kwargs["BLOCK_K"] <= 128 for c in kept)
    assert all(c.kwargs["SPLIT_K"] == 1 for c in kept)  # one K-tile: nothing to split
    assert tk._prune(gemm, {"N": 1, "K": 1, "M": 1})  # never empty


# --------------------------------------------------------------- QuantLinear, swap
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_quant_linear_backends(backend):
    lin = nn.Linear(96, 21)
    q = ql.QuantLinear.from_linear(lin, "INT5_G32", backend=backend)
    assert "INT5_G32" in repr(q) and q.bias is lin.bias
    x = _x(17, 96)
    want = F.linear(x, q.dequantized_weight(), lin.bias)
    got = q(x)
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
    with pytest.raises(KernelError, match="backend must be one of"):
        ql.QuantLinear.from_linear(lin, "INT5_G32", backend="cuda")


class _Toy(nn.Module):
    """Embedding, one block linear with bias, a norm, and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.proj = nn.Linear(64, 64)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.embed(ids))))


def _toy_checkpoint(toy: _Toy, tie_fmt: str | None) -> PackedCheckpoint:
    ckpt = PackedCheckpoint(manifest={"model": "toy"})
    pw = pack_weight(toy.proj.weight, "INT4_G32", name="blk.0.attn_q.weight",
                     hf_name="proj.weight")
    ckpt.packed[pw.name] = pw
    ckpt.floats["blk.0.attn_norm.weight"] = FloatWeight(
        "blk.0.attn_norm.weight", "F32", torch.full((64,), 2.0), "norm.weight")
    if tie_fmt == "F16":
        ckpt.floats["token_embd.weight"] = FloatWeight(
            "token_embd.weight", "F16", toy.embed.weight.detach().half(), "embed.weight")
    elif tie_fmt:
        ckpt.packed["token_embd.weight"] = pack_weight(
            toy.embed.weight, tie_fmt, name="token_embd.weight", hf_name="embed.weight")
    return ckpt


@pytest.mark.parametrize("tie_fmt", [None, "F16", "INT8_G64"])
def test_swap_linears_tied_embeddings(tie_fmt):
    torch.manual_seed(0)
    toy = _Toy().eval().requires_grad_(False)
    ids = torch.tensor([[1, 7, 3, 49, 0]])
    ckpt = _toy_checkpoint(toy, tie_fmt)
    # expected: the in-memory way, every weight replaced by its decoded float values
    emb = toy.embed.weight.clone()
    if tie_fmt == "F16":
        emb = emb.half().float()
    elif tie_fmt:
        emb = dequantize_weight(ckpt.packed["token_embd.weight"])
    ref = _Toy().eval().requires_grad_(False)
    ref.load_state_dict(toy.state_dict())
    ref.proj.weight.data = dequantize_weight(ckpt.packed["blk.0.attn_q.weight"])
    ref.norm.weight.data = torch.full((64,), 2.0)
    ref.embed.weight.data = emb
    want = ref(ids)

    replaced = ql.swap_linears(toy, ckpt, backend="torch")
    assert replaced == (["proj", "head"] if tie_fmt not in (None, "F16") else ["proj"])
    assert isinstance(toy.head, ql.QuantLinear) == (tie_fmt not in (None, "F16"))
    assert toy.proj.bias is not None
    assert torch.equal(toy(ids), want)


def test_swap_linears_errors():
    toy = _Toy()
    ckpt = _toy_checkpoint(toy, None)
    ckpt.packed["blk.0.attn_q.weight"].hf_name = "missing.weight"
    with pytest.raises(KernelError, match="no parameter 'missing.weight'"):
        ql.swap_linears(toy, ckpt)
    ckpt = _toy_checkpoint(toy, None)
    ckpt.packed["blk.0.attn_q.weight"].hf_name = "head.weight"  # (50, 64) vs (64, 64)
    with pytest.raises(KernelError, match=r"checkpoint shape \(64, 64\) does not match"):
        ql.swap_linears(toy, ckpt)
    with pytest.raises(KernelError, match="backend must be one of"):
        ql.swap_linears(toy, ckpt, backend="numpy")


# --------------------------------------------------------------------------- bench
def test_bench_refuses_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = Path(__file__).resolve().parents[1] / "bench" / "kernels.py"
    spec = importlib.util.spec_from_file_location("_bench_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.pop("_bench_kernels", None)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
