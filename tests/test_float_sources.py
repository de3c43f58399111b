"""Float sources: F32/F16/BF16 GGUF files and Hugging Face safetensors folders (float
weights) load, calibrate, get candidates, solve, export and reload; the loaded model says
whether its source is quantized."""

from __future__ import annotations

import numpy as np
import pytest

from autobits.allocation import Allocation
from autobits.exports.gguf import export_gguf
from autobits.model import load_model

FLOATS = ("F32", "F16", "BF16")


@pytest.fixture(scope="module")
def float_ggufs(tmp_path_factory, tiny_lm):
    """The tiny llama (random float weights, SmolLM2's tokenizer) as F32/F16/BF16 GGUFs
    (written on first use)."""
    d = tmp_path_factory.mktemp("float-gguf")

    class Files(dict):
        def __missing__(self, t):
            self[t] = export_gguf(tiny_lm, Allocation.uniform(tiny_lm.name, tiny_lm.specs, t),
                                  d / f"tiny-{t}.gguf")
            return self[t]

    return Files()


def _round(x: np.ndarray, t: str) -> np.ndarray:
    import torch

    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[t]
    return torch.from_numpy(x).to(dtype).float().numpy()


def test_hf_folder_is_a_float_source(tiny_lm):
    assert not tiny_lm.source_quantized
    assert set(tiny_lm.source_types.values()) == {"F32"}
    assert set(tiny_lm.source_types) == {s.name for s in tiny_lm.quantizable}


def test_bf16_hf_folder(tmp_path, tiny_lm, smol_tokenizer):
    import torch

    folder = tmp_path / "bf16"
    tiny_lm.model.to(torch.bfloat16).save_pretrained(folder)
    tiny_lm.model.to(torch.float32)
    tiny_lm.restore()
    smol_tokenizer.save_pretrained(folder)
    lm = load_model(folder)
    assert set(lm.source_types.values()) == {"BF16"} and not lm.source_quantized
    name = "blk.1.ffn_down.weight"
    w = lm.reference_weight(name)
    assert w.dtype == torch.float32  # loaded in float32, values those of the bf16 file
    np.testing.assert_array_equal(w.numpy(), _round(tiny_lm.reference_weight(name).numpy(), "BF16"))


# each new GGUF costs one conversion by transformers (its tokenizer rebuilt: tens of seconds
# on a busy machine); F16 shares its conversion with the pipeline test below
@pytest.mark.parametrize("t", [pytest.param(t, marks=() if t == "F16" else pytest.mark.slow)
                               for t in FLOATS])
def test_float_gguf_loads(float_ggufs, tiny_lm, t):
    lm = load_model(float_ggufs[t])
    assert lm.path == float_ggufs[t]
    assert set(lm.source_types.values()) == {t} and not lm.source_quantized
    for s in lm.quantizable:
        ref = _round(tiny_lm.reference_weight(s.name).numpy(), t)
        np.testing.assert_array_equal(lm.reference_weight(s.name).numpy(), ref, err_msg=s.name)


def test_float_gguf_search_export_reload(float_ggufs, smol_tokenizer, tmp_path):
    """F16 GGUF source -> calibration, candidates, greedy at a mid budget -> GGUF -> reload:
    every tensor has its allocated type and dequantizes to what the search evaluated."""
    import gguf

    from autobits.calibrate import calibrate
    from autobits.evaluate import WeightCache
    from autobits.features import build_candidates
    from autobits.solvers import solve
    from autobits.text import load_text, make_windows

    lm = load_model(float_ggufs["F16"])
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=2, eval=0).calib
    calib = calibrate(lm, w, fisher_windows=1, progress=False)
    cache = WeightCache(lm)
    table = build_candidates(lm, calib, formats=("Q8_0", "Q4_K", "Q4_0"), cache=cache,
                             progress=False)
    alloc = solve("greedy", table, limit_bytes=(table.min_bytes() + table.max_bytes()) // 2)
    assert len(set(alloc.tensors.values())) >= 2  # a real mix
    out = export_gguf(lm, alloc, tmp_path / "mixed.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {n: types[n] for n in alloc.tensors} == dict(alloc.tensors)
    back = load_model(out)
    assert back.source_quantized and back.source_types == dict(alloc.tensors)
    for name, fmt in alloc.tensors.items():
        np.testing.assert_array_equal(back.reference_weight(name).numpy(),
                                      cache.get(name, fmt).numpy(), err_msg=name)
