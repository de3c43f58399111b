"""Calibration pass and proxy error on the tiny llama (and one slow check on SmolLM2)."""

import numpy as np
import pytest
import torch

from autobits.calibrate import HEAD_SITE, Calibration, CalibrationError, calibrate, site_of
from autobits.features import (
    TensorProxy,
    embedding_proxy_error,
    hessian_factor,
    proxy_error,
    row_errors,
)
from autobits.formats import get_format
from autobits.text import load_text, make_windows


@pytest.fixture(scope="module")
def windows(smol_tokenizer):
    return make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=4, eval=0).calib


@pytest.fixture(scope="module")
def calib(tiny_lm, windows):
    return calibrate(tiny_lm, windows, fisher_windows=2, progress=False)


def _direct_inputs(lm, windows):
    """Inputs of every quantizable linear, captured by our own hooks: name -> (N, d)."""
    got: dict[str, list] = {}
    handles = []
    for s in lm.quantizable:
        if s.role in ("token_embd", "output"):
            continue
        mod = lm.model.get_submodule(s.hf_name.removesuffix(".weight"))
        handles.append(mod.register_forward_pre_hook(
            lambda m, a, n=s.name: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    hidden = []
    try:
        with torch.inference_mode():
            for w in windows:
                out = lm.model.model(input_ids=torch.tensor(w[None]), use_cache=False)
                hidden.append(out.last_hidden_state[0])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double() for k, v in got.items()}, torch.cat(hidden).double()


def test_every_quantizable_tensor_is_seen(tiny_lm, calib, windows):
    linear = [s for s in tiny_lm.quantizable if s.role != "token_embd"]
    assert set(calib.tensor_site) == {s.name for s in linear}
    # q/k/v and gate/up share a site: 4 sites per block plus the head input
    assert len(calib.sites) == 4 * 2 + 1 and HEAD_SITE in calib.sites
    assert calib.site("blk.1.attn_k.weight") is calib.site("blk.1.attn_q.weight")
    assert calib.site("blk.0.ffn_up.weight") is calib.site("blk.0.ffn_gate.weight")
    n = windows.size
    assert all(st.n == n for st in calib.sites.values())
    assert calib.n_tokens == n and calib.tied and calib.fisher_tokens == 2 * windows.shape[1]
    assert set(calib.gains) == {s.name for s in tiny_lm.quantizable}
    for s in linear:
        assert calib.gain(s.name).shape == (s.shape[0],) and (calib.gain(s.name) >= 0).all()
        assert calib.importance(s.name).shape == (s.row_length,)
        assert calib.hessian(s.name).shape == (s.row_length, s.row_length)
    assert calib.gain("token_embd.weight").shape == (64,)
    assert calib.head_gain.shape == (tiny_lm.spec("token_embd.weight").shape[0],)


def test_statistics_match_direct_computation(tiny_lm, calib, windows):
    inputs, hidden = _direct_inputs(tiny_lm, windows)
    for s in tiny_lm.quantizable:
        if s.role == "token_embd":
            continue
        x = inputs[s.name]
        st = calib.site(s.name)
        np.testing.assert_allclose(st.sq_mean, x.square().mean(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(st.abs_mean, x.abs().mean(0).numpy(), rtol=1e-5)
        np.testing.assert_allclose(st.abs_max, x.abs().amax(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(st.x4_mean, x.pow(4).mean(0).numpy(), rtol=1e-5)
        h = (x.T @ x / x.shape[0]).numpy()
        np.testing.assert_allclose(st.h, h, rtol=1e-4, atol=1e-5 * np.abs(h).max())
        np.testing.assert_allclose(calib.importance(s.name), np.diag(h), rtol=1e-4)
    head = calib.sites[HEAD_SITE]
    np.testing.assert_allclose(head.sq_mean, hidden.square().mean(0).numpy(), rtol=1e-5)
    # tied: the embedding's importance is the head input's, as llama.cpp's imatrix
    np.testing.assert_array_equal(calib.importance("token_embd.weight"), head.sq_mean.astype(np.float32))
    counts = np.bincount(windows.ravel(), minlength=calib.token_counts.size)
    np.testing.assert_array_equal(calib.token_counts, counts)


def test_token_frequency_good_turing(calib):
    f = calib.hessian("token_embd.weight")
    assert f.ndim == 1 and f.sum() == pytest.approx(1.0) and (f > 0).all()
    c = calib.token_counts
    seen = c > 0
    assert f[~seen].sum() == pytest.approx((c == 1).sum() / c.sum())
    # seen tokens keep their count ratios
    i, j = np.flatnonzero(seen)[:2]
    assert f[i] / f[j] == pytest.approx(c[i] / c[j])


def test_proxy_zero_for_exact_and_grows_as_bits_fall(tiny_lm, calib):
    order = ["F16", "Q8_0", "Q5_0", "Q4_0", "Q3_K", "Q2_K"]
    for s in tiny_lm.quantizable:
        w = tiny_lm.reference_weight(s.name)
        for weighting in ("fisher", "none"):
            proxy = TensorProxy(calib, s.name, w, weighting=weighting)
            assert proxy(w) == 0.0
            errs = []
            for fmt in order:
                f = get_format(fmt)
                if not f.fits(s.row_length):
                    continue
                a = w.numpy()
                errs.append(proxy(f.dequantize(f.quantize(a), a.shape)))
            assert errs == sorted(errs) and errs[0] > 0, (s.name, weighting, errs)


def test_proxy_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 8))
    h = x.T @ x / 500
    w = rng.standard_normal((5, 8))
    dw = 0.01 * rng.standard_normal((5, 8))
    # tr(dW H dW^T) is the mean squared output error over the tokens
    direct = np.mean(np.sum((x @ dw.T) ** 2, axis=1))
    assert proxy_error(w, w + dw, h) == pytest.approx(direct, rel=1e-5)
    gain = rng.uniform(0, 2, 5)
    want = 0.5 * np.mean(np.sum(gain * (x @ dw.T) ** 2, axis=1))
    assert proxy_error(w, w + dw, h, gain=gain) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(row_errors(dw, np.diag(h)).numpy(), (dw**2) @ np.diag(h), rtol=1e-5)
    with pytest.raises(ValueError, match="one per row"):
        proxy_error(w, w + dw, h, gain=gain[:3])
    # the embedding: frequency-weighted rows, plus the head's quadratic form when tied
    e = rng.standard_normal((6, 8))
    de = 0.01 * rng.standard_normal((6, 8))
    freq = rng.dirichlet(np.ones(6))
    lookup = float(np.sum(freq * np.sum(de**2, axis=1)))
    assert embedding_proxy_error(e, e + de, freq) == pytest.approx(lookup, rel=1e-5)
    both = embedding_proxy_error(e, e + de, freq, head_h=h)
    assert both == pytest.approx(lookup + np.trace(de @ h @ de.T), rel=1e-5)


def test_proxy_cholesky_factor_same_value(tiny_lm, calib):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 200)) * rng.lognormal(0, 2, 200)  # outlier channels
    h = x.T @ x / 500
    w = rng.standard_normal((300, 200))
    dw = 0.01 * rng.standard_normal((300, 200))
    low = hessian_factor(h)
    assert low.dtype == torch.float32 and bool((low.triu(1) == 0).all())
    want = np.einsum("ij,jk,ik->i", dw, h, dw)
    np.testing.assert_allclose(row_errors(dw, h, factor=low).numpy(), want, rtol=1e-5)
    gain = rng.uniform(0, 2, 300)
    assert proxy_error(w, w + dw, h, gain=gain, factor=low) == pytest.approx(
        proxy_error(w, w + dw, h, gain=gain), rel=1e-5)
    assert hessian_factor(x[:50].T @ x[:50]) is None  # rank 50 < 200: the plain product
    # tensors reading one input share one factor; the tied embedding gets the head's
    factors: dict = {}
    q, k = (TensorProxy(calib, n, tiny_lm.reference_weight(n), factors=factors)
            for n in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"))
    assert q.factor is not None and q.factor is k.factor
    emb = tiny_lm.reference_weight("token_embd.weight")
    e = TensorProxy(calib, "token_embd.weight", emb, factors=factors)
    assert e.factor is not None and len(factors) == 2
    de = 0.01 * torch.from_numpy(rng.standard_normal(emb.shape).astype(np.float32))
    plain = embedding_proxy_error(emb, emb + de, e.freq, gain=e.gain, head_h=e.head_h,
                                  head_gain=e.head_gain, embed_scale=calib.embed_scale)
    assert e(emb + de) == pytest.approx(plain, rel=1e-5)


def test_workers_same_statistics(tiny_lm, windows):
    one = calibrate(tiny_lm, windows, fisher_windows=2, progress=False, workers=1)
    three = calibrate(tiny_lm, windows, fisher_windows=2, progress=False, workers=3)
    assert three.fisher_tokens == one.fisher_tokens and three.n_tokens == one.n_tokens
    for k, st in one.sites.items():
        assert three.sites[k].n == st.n
        np.testing.assert_allclose(three.sites[k].h, st.h, rtol=1e-5, atol=1e-6 * np.abs(st.h).max())
        np.testing.assert_allclose(three.sites[k].x4_mean, st.x4_mean, rtol=1e-5)
        np.testing.assert_array_equal(three.sites[k].abs_max, st.abs_max)
    for k, g in one.gains.items():
        np.testing.assert_allclose(three.gains[k], g, rtol=1e-5)
    np.testing.assert_allclose(three.head_gain, one.head_gain, rtol=1e-5)
    np.testing.assert_array_equal(three.token_counts, one.token_counts)


def test_save_load_roundtrip(tiny_lm, calib, tmp_path):
    path = calib.save(tmp_path / "c.npz")
    back = Calibration.load(path, lm=tiny_lm)
    assert back.model == calib.model and back.tied and back.fisher_tokens == calib.fisher_tokens
    assert set(back.sites) == set(calib.sites)
    for k, st in calib.sites.items():
        np.testing.assert_array_equal(back.sites[k].h, st.h)
        np.testing.assert_array_equal(back.sites[k].x4_mean, st.x4_mean)
    for k, g in calib.gains.items():
        np.testing.assert_array_equal(back.gains[k], g)
    np.testing.assert_array_equal(back.head_gain, calib.head_gain)
    np.testing.assert_array_equal(back.token_counts, calib.token_counts)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a calibration file"):
        Calibration.load(tmp_path / "bad.npz")


def test_deterministic(tiny_lm, calib, windows):
    again = calibrate(tiny_lm, windows, fisher_windows=2, progress=False)
    for k, st in calib.sites.items():
        np.testing.assert_array_equal(again.sites[k].h, st.h)
        np.testing.assert_array_equal(again.sites[k].sq_mean, st.sq_mean)
    for k, g in calib.gains.items():
        np.testing.assert_array_equal(again.gains[k], g)


def test_without_fisher(tiny_lm, windows):
    c = calibrate(tiny_lm, windows[:1], fisher_windows=0, progress=False)
    assert not c.has_fisher and c.gains == {} and c.gain("blk.0.attn_q.weight") is None
    w = tiny_lm.reference_weight("blk.0.attn_q.weight")
    with pytest.raises(CalibrationError, match="fisher_windows"):
        TensorProxy(c, "blk.0.attn_q.weight", w)
    assert TensorProxy(c, "blk.0.attn_q.weight", w, weighting="none")(w + 0.01) > 0


def test_bad_input(tiny_lm, windows):
    with pytest.raises(CalibrationError, match="non-empty"):
        calibrate(tiny_lm, np.zeros((0, 64), dtype=np.int64), progress=False)
    with pytest.raises(CalibrationError, match=r"token ids must be in \[0, 49152\)"):
        calibrate(tiny_lm, np.full((1, 8), 10**6), progress=False)
    with pytest.raises(CalibrationError, match="integer"):
        calibrate(tiny_lm, np.zeros((1, 8)), progress=False)
    with pytest.raises(CalibrationError, match="fisher_windows"):
        calibrate(tiny_lm, windows, fisher_windows=-1, progress=False)
    assert site_of(tiny_lm.spec("blk.1.ffn_up.weight")) == "blk.1.ffn_in"


@pytest.mark.slow
def test_smollm2_calibration(smollm2, smol_tokenizer):
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=128).split(calib=2, eval=0).calib
    c = calibrate(smollm2, w, fisher_windows=1, progress=False)
    assert len(c.sites) == 30 * 4 + 1 and c.tied
    assert c.hessian("blk.3.ffn_down.weight").shape == (1536, 1536)
    assert np.isfinite(c.head_gain).all() and all(np.isfinite(g).all() for g in c.gains.values())


def _assert_same_sites(part, whole, sites):
    for k in sites:
        a, b = part.sites[k], whole.sites[k]
        assert a.n == b.n, k
        for f in ("sq_mean", "abs_mean", "abs_max", "x4_mean", "h"):
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{k}.{f}")


def _block_calls(lm, block):
    calls = []
    layer = lm.model.model.layers[block]
    return calls, layer.register_forward_hook(lambda *a: calls.append(1))


def test_subset_bit_identical_with_early_stop(tiny_lm, windows):
    whole = calibrate(tiny_lm, windows, fisher_windows=0, progress=False, workers=2)
    blk0 = [s.name for s in tiny_lm.quantizable if s.block == 0]
    calls, handle = _block_calls(tiny_lm, 1)
    try:
        part = calibrate(tiny_lm, windows, fisher_windows=0, progress=False, workers=2,
                         tensors=blk0)
    finally:
        handle.remove()
    assert calls == []  # the pass stopped after block 0: block 1 never ran
    assert part.tensors == tuple(blk0) and set(part.tensor_site) == set(blk0)
    assert set(part.sites) == {f"blk.0.{g}" for g in ("attn_in", "attn_output_in", "ffn_in",
                                                       "ffn_down_in")}
    _assert_same_sites(part, whole, part.sites)
    np.testing.assert_array_equal(part.token_counts, whole.token_counts)
    assert part.covers("blk.0.attn_q.weight") and not part.covers("blk.1.attn_q.weight")
    with pytest.raises(KeyError, match="blk.1.attn_q.weight"):
        part.site("blk.1.attn_q.weight")
    with pytest.raises(KeyError, match="token_embd"):
        part.site("token_embd.weight")
    # the last block only: the whole pass up to it, one block's sites
    blk1 = ["blk.1.ffn_down.weight", "blk.1.attn_k.weight"]
    last = calibrate(tiny_lm, windows, fisher_windows=0, progress=False, workers=2, tensors=blk1)
    assert set(last.sites) == {"blk.1.ffn_down_in", "blk.1.attn_in"}
    _assert_same_sites(last, whole, last.sites)


def test_subset_without_early_stop(tiny_lm, windows, calib):
    # with Fisher windows the whole pass runs (backward); the sites and gains are the same
    names = ["blk.0.attn_v.weight", "blk.1.ffn_up.weight"]
    calls, handle = _block_calls(tiny_lm, 1)
    try:
        part = calibrate(tiny_lm, windows, fisher_windows=2, progress=False, tensors=names)
    finally:
        handle.remove()
    assert len(calls) == len(windows)
    assert set(part.sites) == {"blk.0.attn_in", "blk.1.ffn_in"} and part.has_fisher
    _assert_same_sites(part, calib, part.sites)
    assert set(part.gains) == set(names)
    for k in names:
        np.testing.assert_array_equal(part.gains[k], calib.gains[k])
    np.testing.assert_array_equal(part.head_gain, calib.head_gain)
    # the tied embedding reads the head site: the whole pass, no Fisher needed
    head = calibrate(tiny_lm, windows, fisher_windows=0, progress=False,
                     tensors=["token_embd.weight", "blk.0.attn_q.weight"])
    whole = calibrate(tiny_lm, windows, fisher_windows=0, progress=False)
    assert set(head.sites) == {HEAD_SITE, "blk.0.attn_in"} and head.needs_head_site
    _assert_same_sites(head, whole, head.sites)
    np.testing.assert_array_equal(head.importance("token_embd.weight"),
                                  whole.importance("token_embd.weight"))


def test_subset_check_and_files(tiny_lm, windows, tmp_path):
    names = ["blk.1.attn_q.weight", "blk.1.attn_output.weight"]
    part = calibrate(tiny_lm, windows[:2], fisher_windows=0, progress=False, tensors=names)
    part.check_model(tiny_lm, tensors=names)
    part.check_model(tiny_lm, tensors=names[:1])
    with pytest.raises(CalibrationError, match=r"measured 2 tensors, 13 of the 15"):
        part.check_model(tiny_lm)  # a subset does not cover the whole model
    with pytest.raises(CalibrationError, match=r"measured 2 tensors, 1 of the 2 of .* asked for are not among them"):
        part.check_model(tiny_lm, tensors=["blk.1.attn_q.weight", "blk.0.attn_q.weight"])
    with pytest.raises(CalibrationError, match=r"1 of the 1 tensors to check"):
        part.check_model(tiny_lm, tensors=["nope.weight"])
    back = Calibration.load(part.save(tmp_path / "part.npz"))
    assert back.tensors == tuple(names) and set(back.sites) == set(part.sites)
    back.check_model(tiny_lm, tensors=names)
    _assert_same_sites(back, part, part.sites)
    whole = calibrate(tiny_lm, windows[:2], fisher_windows=0, progress=False)
    assert whole.tensors is None and whole.covers("blk.0.attn_q.weight")
    whole.check_model(tiny_lm, tensors=names)
    assert Calibration.load(whole.save(tmp_path / "whole.npz"), lm=tiny_lm).tensors is None
    with pytest.raises(CalibrationError, match=r"1 of the 1 named are not among its 15"):
        calibrate(tiny_lm, windows[:1], progress=False, tensors=["blk.9.attn_q.weight"])
    with pytest.raises(CalibrationError, match="collection of tensor names"):
        calibrate(tiny_lm, windows[:1], progress=False, tensors="blk.0.attn_q.weight")
