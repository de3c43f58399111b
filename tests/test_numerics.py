"""llama.cpp's activation rounding (autobits.numerics) and Evaluator(llama_numerics=True)."""

import numpy as np
import pytest
import torch

from autobits.allocation import Allocation
from autobits.evaluate import Evaluator
from autobits.numerics import VEC_DOT, ActivationQuantizer, fake_quantize_q8


def test_q8_0_activation_rounding_equals_gguf_q8_0():
    """Q8_0 activations are Q8_0 blocks: our fake quantization equals gguf-py's round trip."""
    import gguf

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 576)) * rng.uniform(0.01, 20, (8, 1))).astype(np.float32)
    x[3, 40:72] = 0.0  # an all-zero block keeps scale 0
    ours = fake_quantize_q8(torch.from_numpy(x), 32, True).numpy()
    ref = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                                 gguf.GGMLQuantizationType.Q8_0)
    # ggml rounds halves away from zero, torch to even: at most one code step apart, rarely
    step = np.abs(x).reshape(-1, 32).max(1) / 127
    diff = np.abs(ours - ref).reshape(-1, 32)
    assert (diff <= step[:, None] * 1.001 + 1e-12).all()
    assert (diff > 0).mean() < 1e-3
    assert (ours[3, 40:72] == 0).all()


def test_q8_k_blocks_and_bad_row():
    x = torch.randn(2, 512)
    y = fake_quantize_q8(x, 256, False)
    blocks = (x.reshape(-1, 256).abs().amax(-1) / 127)
    codes = y.reshape(-1, 256) / blocks[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 127 + 1e-4
    with pytest.raises(ValueError, match="row length 500 is not a multiple of block size 256"):
        fake_quantize_q8(torch.randn(2, 500), 256, False)


def test_every_ggml_format_has_a_vec_dot_rule():
    from autobits.formats import FORMAT_TABLE

    ggml = [n for n in FORMAT_TABLE if not n.startswith("INT") and n != "F32"]
    assert sorted(VEC_DOT) == sorted(ggml)


def test_hooks_follow_the_allocation(tiny_lm):
    """Reference weights get float activations; a quantized tensor's layer gets rounded inputs;
    removing the hooks restores the plain forward."""
    windows = np.arange(2 * 64).reshape(2, 64) % 1000 + 5
    plain = Evaluator(tiny_lm, windows)
    llama = Evaluator(tiny_lm, windows, llama_numerics=True)
    try:
        f32 = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "F32")
        assert llama.evaluate(f32).kld == pytest.approx(0.0, abs=1e-9)
        assert llama.ref_ppl == pytest.approx(plain.ref_ppl, rel=1e-9)
        q8 = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
        a, b = plain.evaluate(q8), llama.evaluate(q8)
        assert b.kld > a.kld > 0  # rounding the activations too costs something
        f16 = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "F16")
        assert llama.evaluate(f16).kld < b.kld
    finally:
        llama._act.remove()
    assert plain.evaluate(q8).kld == pytest.approx(a.kld, rel=1e-9)


def test_activation_quantizer_covers_the_tied_head(tiny_lm):
    act = ActivationQuantizer(tiny_lm)
    try:
        n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_lm.model.modules())
        assert len(act._handles) == n_linear  # every projection and the (tied) output head
    finally:
        act.remove()


def test_shared_inputs_are_rounded_once(tiny_lm, monkeypatch):
    """q/k/v (and gate/up) read one input: with one rounding rule it is rounded once per
    block, and the logits are those of rounding it for every projection."""
    import autobits.numerics as numerics

    class Forgetful:  # a memo that never remembers: every projection rounds its own input
        item = None

        def __setattr__(self, key, value):
            pass

    tensors = {s.name: "F16" if s.role == "attn_v" else "Q4_0" for s in tiny_lm.quantizable}
    calls = []
    real = numerics.fake_quantize_q8
    monkeypatch.setattr(numerics, "fake_quantize_q8",
                        lambda x, block, fp16: calls.append(block) or real(x, block, fp16))
    ids = torch.arange(5, 69).reshape(1, -1)
    act = ActivationQuantizer(tiny_lm)
    try:
        act.set(tensors)
        with torch.inference_mode():
            once = tiny_lm.model(ids).logits
        n_once = len(calls)
        act.set(tensors)
        act._last = Forgetful()
        calls.clear()
        with torch.inference_mode():
            every = tiny_lm.model(ids).logits
    finally:
        act.remove()
    assert torch.equal(once, every)
    n_blocks = len(tiny_lm.model.model.layers)
    # per block: q and k (Q8_0 rounding) once (v: F16, another rule), o, gate and up
    # once, down; and the head
    assert (len(calls), n_once) == (n_blocks * 6 + 1, n_blocks * 4 + 1)


def test_heldout_numerics_follow_the_prepare_config(tiny_lm):
    """Held-out metrics use llama.cpp's numerics by default; the reward slice stays float;
    ``numerics="float"`` is plain torch; an unknown name fails at construction."""
    from autobits.errors import AutobitsError
    from autobits.pipeline import PrepareConfig, prepare

    cfg = PrepareConfig(model=tiny_lm.name, text="stdlib", ctx=32, calib_windows=1, eval_windows=1,
                        reward_windows=1, reward_ctx=32, fisher_windows=0)
    p = prepare(cfg, lm=tiny_lm, progress=False)
    try:
        assert cfg.numerics == "llama" and p.heldout_evaluator.llama_numerics
        assert not p.reward_evaluator.llama_numerics
        alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0", fallback=True)
        llama = p.heldout(alloc)
    finally:
        p.heldout_evaluator._act.remove()
    from dataclasses import replace

    f = prepare(replace(cfg, numerics="float"), lm=tiny_lm, progress=False)
    assert not f.heldout_evaluator.llama_numerics
    plain = f.heldout(alloc)
    assert plain.bytes == llama.bytes and plain.kld != llama.kld
    with pytest.raises(AutobitsError, match="numerics must be one of llama, float"):
        replace(cfg, numerics="fp8")
