"""llama-quantize recipes (``autobits export --recipe``): syntax, and formats llama.cpp could not
write as asked are refused (the llama.cpp comparison is in test_llama_interop.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from autobits.exports.recipe import RecipeError, read_recipe, recipe_args, recipe_lines, write_recipe


def _spec(name, shape, source="F32"):
    return SimpleNamespace(name=name, shape=shape, source_type=source, quantizable=True)


SPECS = [_spec("token_embd.weight", (100, 64)), _spec("blk.0.attn_q.weight", (64, 64)),
         _spec("blk.0.ffn_down.weight", (64, 256)), _spec("output.weight", (100, 64))]


def _alloc(**tensors):
    base = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "IQ4_NL",
            "blk.0.ffn_down.weight": "Q4_K", "output.weight": "Q5_0"}
    return SimpleNamespace(tensors={**base, **tensors})


def test_recipe_syntax_and_flags(tmp_path):
    path, args = write_recipe(_alloc(), SPECS, tmp_path / "r.txt")
    assert path.read_text().splitlines() == [
        r"^token_embd\.weight$=q8_0", r"^blk\.0\.attn_q\.weight$=iq4_nl",
        r"^blk\.0\.ffn_down\.weight$=q4_k", r"^output\.weight$=q5_0"]
    assert args.read_text().split() == ["--token-embedding-type", "q8_0", "--output-tensor-type",
                                        "q5_0", "--tensor-type-file", str(path)]
    assert read_recipe(path)[2] == (r"^blk\.0\.ffn_down\.weight$", "q4_k")
    quantized = [_spec(s.name, s.shape, "Q4_1") for s in SPECS]
    assert "--allow-requantize" in recipe_args(_alloc(), quantized, path)


@pytest.mark.parametrize("tensors, message", [
    ({"blk.0.ffn_down.weight": "INT4_G32"}, "not a ggml type"),
    ({"blk.0.attn_q.weight": "Q4_K"}, "would fall back"),
])
def test_recipe_never_asks_what_llama_cpp_would_replace(tensors, message, tmp_path):
    with pytest.raises(RecipeError, match=message):
        recipe_lines(_alloc(**tensors), SPECS)
    bad = tmp_path / "bad.txt"
    bad.write_text("blk.0.attn_q.weight q4_0\n")
    with pytest.raises(RecipeError, match="malformed"):
        read_recipe(bad)
