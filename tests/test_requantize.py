"""The requantize rule: a quantized source is refused by search and export unless
``--allow-requantize``; metrics.json and report.md record it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from autobits.app.cli import main
from autobits.requantize import (
    RequantizeError,
    check_requantize,
    is_quantized_source,
    source_record,
)

TINY = ["--ctx", "64", "--calib-windows", "2", "--windows", "1", "--reward-windows", "1",
        "--reward-ctx", "64"]


def _spec(name, t, quantizable=True):
    return SimpleNamespace(name=name, source_type=t, quantizable=quantizable)


def test_rule_from_the_source_types():
    smol = [_spec(f"blk.{i}.w", "Q4_1") for i in range(3)] + [_spec("token_embd.weight", "Q8_0"),
                                                             _spec("n", "F32", False)]
    assert is_quantized_source(smol)
    with pytest.raises(RequantizeError) as e:
        check_requantize(smol, model="smollm2-135m", allow=False)
    msg = str(e.value)
    assert "\n" not in msg and "'smollm2-135m'" in msg and "Q4_1 on 3 tensors, Q8_0 on 1 tensor" in msg
    assert "reproduce it exactly" in msg and "--allow-requantize" in msg
    check_requantize(smol, model="smollm2-135m", allow=True)  # allowed: no error
    for t in ("F32", "F16", "BF16"):  # a float source is never refused
        check_requantize([_spec("w", t), _spec("n", "Q4_0", False)], model="m", allow=False)
    assert source_record(smol, allow=True) == {
        "quantized": True, "types": {"Q4_1": 3, "Q8_0": 1}, "allow_requantize": True}


@pytest.fixture(scope="module")
def tiny_q8(tiny_lm, tmp_path_factory):
    """The tiny model as a Q8_0 GGUF file: a quantized source."""
    from autobits.allocation import Allocation
    from autobits.exports.gguf import export_gguf

    alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
    path = export_gguf(tiny_lm, alloc, tmp_path_factory.mktemp("q8") / "tiny-q8.gguf")
    return path, alloc.save(path.with_suffix(".json"))


def test_search_and_export_refuse_a_quantized_source(tiny_q8, tmp_path, capsys):
    path, alloc = tiny_q8
    code = main(["search", "--model", str(path), *TINY, "--target-bpw", "6",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.splitlines()[-1]  # (transformers' progress bars before it)
    assert code == 2 and err.startswith("autobits search: error: model "), err
    assert "already quantized (Q8_0 on 15 tensors)" in err and "--allow-requantize" in err
    assert "optimistic" in err and not (tmp_path / "run" / "allocation.json").exists()
    code = main(["export", "--model", str(path), "--allocation", str(alloc),
                 "--gguf", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "already quantized" in err and not (tmp_path / "x.gguf").exists()


def test_allowed_requantize_is_recorded(tiny_q8, tmp_path):
    from autobits.allocation import Budget
    from autobits.app.workflow import SearchConfig, search
    from autobits.pipeline import PrepareConfig

    path, _ = tiny_q8
    config = SearchConfig(
        prepare=PrepareConfig(model=str(path), ctx=64, calib_windows=2, eval_windows=1,
                              reward_windows=1, reward_ctx=64, fisher_windows=0),
        budget=Budget(target_bpw=6), allocator="uniform", baselines=(), out=tmp_path / "run",
        allow_requantize=True)
    outcome = search(config)
    metrics = json.loads(outcome.paths["metrics"].read_text())
    assert metrics["source"] == {"quantized": True, "types": {"Q8_0": 15},
                                 "allow_requantize": True}
    report = outcome.paths["report"].read_text()
    assert "- source: already quantized (Q8_0 x15; requantized with --allow-requantize)" in report
