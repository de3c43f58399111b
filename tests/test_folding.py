"""Scale Folding: float invariance per architecture, the search, the report, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autobits.folding import (
    FoldError,
    apply_fold,
    collect_site_stats,
    fold,
    fold_scales,
    fold_state,
    max_relative_logit_diff,
    site_error,
    site_plan,
)
from autobits.model import load_model

TOL = 1e-3  # max relative logit difference the issue allows


def _save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _randomize_norms(model, seed: int) -> None:
    """Non-trivial norm weights (HF initialises them to 1, or 0 for gemma's 1 + w)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory, smol_tokenizer):
    """A 2-block qwen2 (q/k/v biases, GQA 4/2, untied head), random weights."""
    import torch
    import transformers

    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
    )
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    _randomize_norms(model, 1)
    return _save(model, tmp_path_factory.mktemp("tiny-qwen2"), smol_tokenizer)


@pytest.fixture(scope="module")
def gemma3_folder(tmp_path_factory, smol_tokenizer):
    """A 2-block gemma3 text model (RMSNorm x (1 + w), 4 heads of 32 over 1 kv head)."""
    import torch
    import transformers

    torch.manual_seed(2)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=512, sliding_window=16,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.eos_token_id,
    )
    model = transformers.Gemma3ForCausalLM(cfg)
    _randomize_norms(model, 2)
    return _save(model, tmp_path_factory.mktemp("tiny-gemma3"), smol_tokenizer)


@pytest.fixture(scope="module")
def windows(smol_tokenizer):
    from autobits.text import load_text, make_windows

    return make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=4, eval=2)


def _logits(lm, ids):
    import torch

    lm.restore()
    with torch.inference_mode():
        return lm.model(input_ids=torch.as_tensor(np.array(ids)), use_cache=False).logits


def _random_scales(lm, seed: int, spread: float = 1.0) -> dict[str, np.ndarray]:
    """Log-uniform scales over ``10**-spread .. 10**spread`` for every site."""
    rng = np.random.default_rng(seed)
    return {s.id: 10 ** rng.uniform(-spread, spread, s.dim) for s in site_plan(lm)}


# ------------------------------------------------------------------------ the plan
def test_site_plan_llama(tiny_lm):
    plan = site_plan(tiny_lm)
    assert [s.id for s in plan[:4]] == [f"blk.0.{k}" for k in
                                        ("attn_in", "attn_out", "ffn_in", "ffn_out")]
    assert len(plan) == 8
    by = {s.id: s for s in plan}
    assert by["blk.1.attn_out"].dim == 32 and by["blk.1.attn_out"].repeat == 2
    assert by["blk.1.ffn_out"].rows == ("blk.1.ffn_up.weight",)
    assert by["blk.0.attn_in"].norm == "blk.0.attn_norm.weight"
    assert by["blk.0.ffn_in"].norm == "blk.0.ffn_norm.weight"
    touched = {n for s in plan for n in s.consumers + s.compensated}
    assert "token_embd.weight" not in touched and "output_norm.weight" not in touched


def test_gqa_expand_matches_repeat_kv(tiny_lm):
    """o_proj channel h*hd + d reads v channel (h // n_rep)*hd + d (transformers' repeat_kv)."""
    site = {s.id: s for s in site_plan(tiny_lm)}["blk.0.attn_out"]
    s = np.arange(site.dim, dtype=float)
    e = site.expand(s)
    hd, rep = site.head_dim, site.repeat
    assert e.shape == (site.dim * rep,)
    for h in range(site.dim // hd * rep):
        assert np.array_equal(e[h * hd : (h + 1) * hd], s[(h // rep) * hd : (h // rep + 1) * hd])
    assert np.array_equal(site.reduce(e, "max"), s) and np.array_equal(site.reduce(e, "mean"), s)


# ------------------------------------------------------------------ float invariance
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_random_scales_keep_float_outputs(arch, tiny_folder, qwen2_folder, gemma3_folder, windows):
    """Scales spanning 100x on every site leave the logits unchanged up to rounding."""
    folder = {"llama": tiny_folder, "qwen2": qwen2_folder, "gemma3": gemma3_folder}[arch]
    lm = load_model(folder)
    assert lm.architecture == arch
    before = _logits(lm, windows.eval)
    ref = {s.name: lm.reference_weight(s.name).clone() for s in lm.specs if s.hf_name}
    scales = _random_scales(lm, seed=3)
    apply_fold(lm, scales)
    after = _logits(lm, windows.eval)
    diff = max_relative_logit_diff(before, after)
    assert diff < TOL, f"{arch}: max relative logit difference {diff:.2e}"
    # what was meant to change did, nothing else
    touched = {n for s in site_plan(lm) for n in s.consumers + s.compensated}
    for name, old in ref.items():
        same = bool((lm.reference_weight(name) == old).all())
        assert same == (name not in touched), name
        assert lm.parameter(name).data_ptr() == lm.reference_weight(name).data_ptr()
    # the compensation formula, per architecture
    s = scales["blk.1.attn_in"]
    off = 1.0 if arch == "gemma3" else 0.0
    want = (ref["blk.1.attn_norm.weight"].double().numpy() + off) / s - off
    np.testing.assert_allclose(lm.reference_weight("blk.1.attn_norm.weight").numpy(), want,
                               rtol=1e-5, atol=1e-6)
    if arch == "qwen2":
        sv = scales["blk.0.attn_out"]
        np.testing.assert_allclose(lm.reference_weight("blk.0.attn_v.bias").numpy(),
                                   ref["blk.0.attn_v.bias"].numpy() / sv, rtol=1e-5)
    assert set(fold_state(lm)) == set(scales)


def test_restore_and_set_weight_after_fold(tiny_folder, windows):
    lm = load_model(tiny_folder)
    apply_fold(lm, _random_scales(lm, seed=4))
    folded = _logits(lm, windows.eval)
    name = "blk.0.attn_q.weight"
    import torch

    lm.set_weight(name, torch.zeros_like(lm.reference_weight(name)))
    lm.restore()
    assert max_relative_logit_diff(folded, _logits(lm, windows.eval)) == 0.0


# -------------------------------------------------------------------------- search
def test_fold_scales_form():
    a = np.array([1.0, 4.0, 0.0, 16.0])
    w = np.array([2.0, 2.0, 1.0, 8.0])
    assert np.array_equal(fold_scales(a, w, alpha=0.0), np.ones(4))
    s = fold_scales(a, w, alpha=0.5, beta=0.0)
    assert np.exp(np.log(s).mean()) == pytest.approx(1.0)
    assert s[1] / s[0] == pytest.approx(2.0) and s[3] / s[1] == pytest.approx(2.0)
    assert s[2] / s[0] == pytest.approx((16e-3) ** 0.5)  # dead channel floored at 1e-3 max
    r = fold_scales(a, w, alpha=1.0, beta=1.0)
    assert r[3] / r[0] == pytest.approx((16 / 8) / (1 / 2))


def test_site_error_is_the_output_error(tiny_lm):
    """tr(dW H dW^T) with H = X^T X / n equals the mean squared output error on X."""
    from autobits.formats import get_format

    rng = np.random.default_rng(0)
    W = rng.standard_normal((16, 64)).astype(np.float32)
    X = (rng.standard_normal((500, 64)) * rng.uniform(0.1, 5, 64)).astype(np.float32)
    H = X.T.astype(np.float64) @ X / len(X)
    s = rng.uniform(0.5, 2, 64)
    f = get_format("Q4_0")
    ws = (W * s.astype(np.float32)).astype(np.float32)
    deq = f.dequantize(f.quantize(ws), ws.shape)
    direct = ((X @ (deq / s.astype(np.float32) - W).T) ** 2).sum(1).mean()
    assert site_error([W], H, s, "Q4_0") == pytest.approx(direct, rel=1e-4)


@pytest.fixture(scope="module")
def folded_tiny(tiny_folder, windows):
    lm = load_model(tiny_folder)
    # plant activation outliers: a few norm channels 20x larger (compensated by the float
    # model being whatever it is; this only makes folding worth something)
    import torch

    with torch.no_grad():
        for b in range(2):
            for t in ("attn_norm", "ffn_norm"):
                w = lm.reference_weight(f"blk.{b}.{t}.weight")
                w[[3, 17, 40]] *= 20.0
    lm.restore()
    before = _logits(lm, windows.eval)
    stats = collect_site_stats(lm, windows.calib)
    report = fold(lm, stats, fmt="Q4_0")
    return lm, before, stats, report


def test_fold_keeps_float_and_reduces_error(folded_tiny, windows):
    lm, before, stats, report = folded_tiny
    diff = max_relative_logit_diff(before, _logits(lm, windows.eval))
    assert diff < TOL, f"max relative logit difference {diff:.2e}"
    assert len(report.groups) == 8 and report.fmt == "Q4_0"
    for g in report.groups:
        assert g.error_after <= g.error_before
        assert g.grid[0][:2] == (0.0, 0.0) and g.grid[0][2] == g.error_before
        assert min(e for _, _, e in g.grid) == g.error_after
        assert 0 < g.error_before < g.energy
    assert report.folded >= 1 and report.error_after < report.error_before
    # the outlier channels of the norm-fed sites get the largest scales
    g = {g.site: g for g in report.groups}["blk.0.attn_in"]
    if g.alpha > 0:
        assert set(np.argsort(g.scales)[-3:]) == {3, 17, 40}
    assert report.tokens == 4 * 64


def test_fold_error_matches_folded_weights(folded_tiny):
    """error_after recomputed on the folded model agrees: in its own coordinates (x' = x/s),
    with the output rows of attn_v / ffn_up weighted back by the scales folded into them."""
    import torch

    from autobits.formats import get_format

    lm, _, stats, report = folded_tiny
    plan = {s.id: s for s in site_plan(lm)}
    row_scale = {n: report.scales()[sid] for sid in report.scales()
                 for n in plan[sid].rows if n.endswith(".weight")}
    q4 = get_format("Q4_0")
    for g in report.groups:
        se = plan[g.site].expand(g.scales)
        H = torch.from_numpy(stats[g.site].hessian / np.outer(se, se))  # statistics of x / s
        err = 0.0
        for n in g.consumers:
            w = lm.reference_weight(n).numpy()
            d = q4.dequantize(q4.quantize(w), w.shape) - w
            d = torch.from_numpy(d * row_scale.get(n, np.ones(1))[:, None])
            err += float(((d @ H) * d).sum())
        assert err == pytest.approx(g.error_after, rel=1e-2), g.site


def test_report_json(folded_tiny):
    _, _, _, report = folded_tiny
    d = json.loads(json.dumps(report.to_json()))
    assert d["fmt"] == "Q4_0" and len(d["groups"]) == 8
    assert d["error_after"] == pytest.approx(report.error_after)
    assert "scales" not in d["groups"][0]
    with_scales = report.to_json(scales=True)
    assert len(with_scales["groups"][0]["scales"]) == report.groups[0].scales.size


def test_alpha_zero_only_is_identity(tiny_folder, windows):
    lm = load_model(tiny_folder)
    ref = {s.name: lm.reference_weight(s.name) for s in lm.specs if s.hf_name}
    report = fold(lm, windows.calib, alphas=(0.0,), kinds=("ffn_out",))
    assert report.folded == 0 and [g.kind for g in report.groups] == ["ffn_out", "ffn_out"]
    assert all(lm.reference_weight(n).data_ptr() == t.data_ptr() for n, t in ref.items())


def test_fold_fallback_format_and_imatrix(tiny_folder, windows):
    """Q4_K fits only ffn_down (256 wide); the others are searched with its fallback Q5_0."""
    lm = load_model(tiny_folder)
    report = fold(lm, windows.calib, fmt="q4_k", alphas=(0.0, 0.5), betas=(0.0,),
                  imatrix=True)
    assert report.fmt == "Q4_K" and report.imatrix
    assert all(g.error_after <= g.error_before for g in report.groups)


def test_fold_from_calibration_and_folded_calibration(tiny_folder, windows):
    """fold() takes a Calibration; folded_calibration() equals calibrating the folded model."""
    from autobits.calibrate import calibrate
    from autobits.folding import folded_calibration

    lm = load_model(tiny_folder)
    before = calibrate(lm, windows.calib[:2], fisher_windows=1, progress=False)
    report = fold(lm, before, alphas=(0.0, 0.5), betas=(0.0,))
    assert report.folded > 0 and report.tokens == 2 * 64
    want = calibrate(lm, windows.calib[:2], fisher_windows=1, progress=False)
    got = folded_calibration(before, lm)
    for key, st in want.sites.items():
        g = got.sites[key]
        for k in ("sq_mean", "abs_mean", "abs_max", "h"):
            a, b = getattr(g, k), getattr(st, k)
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max(), (key, k)
    for name, gain in want.gains.items():
        assert np.abs(got.gains[name] - gain).max() <= 1e-3 * np.abs(gain).max(), name


# ----------------------------------------------------------------------- bad input
def test_bad_input(tiny_folder, windows):
    lm = load_model(tiny_folder)
    with pytest.raises(FoldError, match=r"\(31,\) scales given, expected \(32,\)"):
        apply_fold(lm, {"blk.0.attn_out": np.ones(31)})
    with pytest.raises(FoldError, match="1 of 64 scales are not finite"):
        apply_fold(lm, {"blk.0.attn_in": np.r_[np.ones(63), 0.0]})
    with pytest.raises(FoldError, match="unknown sites"):
        apply_fold(lm, {"blk.9.attn_in": np.ones(64)})
    with pytest.raises(FoldError, match=r"must lie in \[0, 1\]"):
        fold(lm, windows.calib, alphas=(0.0, 1.5))
    with pytest.raises(FoldError, match="unknown site kinds"):
        fold(lm, windows.calib, kinds=("qkv",))
    with pytest.raises(FoldError, match="non-empty"):
        fold(lm, np.zeros((0, 8), dtype=np.int64))
    assert fold_state(lm) is None  # nothing was applied
    fold(lm, windows.calib, alphas=(0.0, 0.3), betas=(0.0,), kinds=("ffn_in",))
    with pytest.raises(FoldError, match="already folded"):
        fold(lm, windows.calib)


# ------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_smollm2_fold_keeps_float_outputs(smol_tokenizer):
    from autobits.text import load_text, make_windows

    lm = load_model("smollm2-135m")
    split = make_windows(load_text("stdlib"), smol_tokenizer, ctx=128).split(calib=4, eval=2)
    before = _logits(lm, split.eval)
    report = fold(lm, split.calib, fmt="Q4_0", alphas=(0.0, 0.4, 0.8))
    diff = max_relative_logit_diff(before, _logits(lm, split.eval))
    assert diff < TOL, f"smollm2-135m: max relative logit difference {diff:.2e}"
    assert report.error_after < report.error_before and report.folded > 0
