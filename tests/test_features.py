"""Candidate table and feature table on the tiny llama; the features CLI."""

import json

import numpy as np
import pytest

from autobits.calibrate import CalibrationError, calibrate
from autobits.app.cli import main
from autobits.evaluate import WeightCache
from autobits.features import (
    FEATURE_NAMES,
    FEATURE_RANGES,
    FEATURE_SPEC_VERSION,
    FeatureTable,
    build_candidates,
    extract_features,
)
from autobits.specs import QUANTIZABLE_ROLES
from autobits.text import load_text, make_windows

FORMATS = ("F16", "Q8_0", "Q4_K", "Q4_0", "Q2_K")  # a quick subset for most tests


@pytest.fixture(scope="module")
def calib(tiny_lm, smol_tokenizer):
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=3, eval=0).calib
    return calibrate(tiny_lm, w, fisher_windows=1, progress=False)


@pytest.fixture(scope="module")
def cache(tiny_lm):
    return WeightCache(tiny_lm)


@pytest.fixture(scope="module")
def table(tiny_lm, calib, cache):
    return build_candidates(tiny_lm, calib, formats=FORMATS, cache=cache, progress=False)


@pytest.fixture(scope="module")
def feats(tiny_lm, calib, table):
    return extract_features(tiny_lm, calib, table)


def test_candidates_cover_every_tensor_and_fill_the_cache(tiny_lm, table, cache):
    assert table.tensors == tuple(s.name for s in tiny_lm.quantizable)
    for s in tiny_lm.quantizable:
        opts = table.options[s.name]
        assert [c.fmt for c in opts] == list(s.valid_formats(FORMATS))
        assert all(c.bytes == s.nbytes(c.fmt) for c in opts)
        errs = [c.error for c in opts]
        assert errs == sorted(errs) and errs[-1] > 0
    # the quantized bytes of every candidate are kept, but for the float formats (a cast)
    kept = sum(1 for o in table.options.values() for c in o if cache.keeps(c.fmt))
    assert len(cache) == kept and kept < sum(len(o) for o in table.options.values())
    n = cache.quantized
    hit = cache.get("blk.0.ffn_down.weight", "Q2_K")  # kept, not re-quantized
    assert len(cache) == kept and cache.quantized == n
    assert hit.shape == tiny_lm.spec("blk.0.ffn_down.weight").shape
    assert table.meta["weighting"] == "fisher" and "quantize" in table.meta["timing"]


def test_candidates_single_thread_same_result(tiny_lm, calib, table):
    one = build_candidates(tiny_lm, calib, formats=FORMATS, workers=1, progress=False)
    # the same up to float32 summation order (torch's thread count differs)
    for name, opts in table.options.items():
        assert [(c.fmt, c.bytes) for c in one.options[name]] == [(c.fmt, c.bytes) for c in opts]
        assert [c.error for c in one.options[name]] == pytest.approx([c.error for c in opts], rel=1e-6)


def test_imatrix_and_cache_consistency(tiny_lm, calib, cache):
    with pytest.raises(CalibrationError, match="another importance|importance vector"):
        bad = WeightCache(tiny_lm, {"blk.0.attn_q.weight": np.ones(64, np.float32)})
        build_candidates(tiny_lm, calib, formats=("Q4_0",), imatrix=True, cache=bad, progress=False)
    c2 = WeightCache(tiny_lm)
    t = build_candidates(tiny_lm, calib, formats=("Q4_0",), imatrix=True, cache=c2, progress=False)
    np.testing.assert_array_equal(c2.importance["blk.0.ffn_down.weight"],
                                  calib.importance("blk.0.ffn_down.weight"))
    assert t.meta["imatrix"] is True
    with pytest.raises(CalibrationError, match="imatrix=False"):
        build_candidates(tiny_lm, calib, formats=("Q4_0",), cache=c2, progress=False)


def test_feature_table_shape_names_ranges(tiny_lm, feats):
    n = len(tiny_lm.quantizable)
    assert feats.values.shape == (n, len(FEATURE_NAMES)) and len(FEATURE_NAMES) >= 11 + 8
    assert feats.names == tuple(s.name for s in tiny_lm.quantizable)
    assert feats.feature_names == FEATURE_NAMES and feats.version == FEATURE_SPEC_VERSION
    assert np.isfinite(feats.values).all()
    for j, f in enumerate(FEATURE_NAMES):
        lo, hi = FEATURE_RANGES[f]
        assert (feats.values[:, j] >= lo).all() and (feats.values[:, j] <= hi).all(), f
    roles = feats.values[:, [FEATURE_NAMES.index(f"role_{r}") for r in QUANTIZABLE_ROLES]]
    assert (roles.sum(1) == 1).all()
    row = feats.row("blk.1.ffn_down.weight")
    assert row["depth"] == 1.0 and row["role_ffn_down"] == 1.0 and row["fan_ratio"] == 2.0
    assert feats.row("token_embd.weight")["depth"] == 0.0
    # q/k/v read one input: identical activation features
    q, k = feats.row("blk.0.attn_q.weight"), feats.row("blk.0.attn_k.weight")
    assert q["act_kurtosis"] == k["act_kurtosis"] and q["act_absmean"] == k["act_absmean"]
    raw = feats.raw["blk.0.ffn_down.weight"]
    assert raw["ref_format"] == "Q4_0" and raw["high_format"] == "Q8_0" and raw["err_ref"] > 0
    with pytest.raises(ValueError, match="expected"):
        FeatureTable(model="m", names=("a",), values=np.zeros((1, 3)))


def test_feature_table_json_csv_roundtrip(feats, tmp_path):
    payload = json.loads(json.dumps(feats.to_json()))
    back = FeatureTable.from_json(payload)
    np.testing.assert_array_equal(back.values, feats.values)
    assert back.names == feats.names
    text = feats.to_csv(tmp_path / "f.csv")
    lines = text.splitlines()
    assert lines[0].split(",") == ["tensor", *FEATURE_NAMES] and len(lines) == len(feats) + 1
    assert (tmp_path / "f.csv").read_text() == text


def test_features_deterministic(tiny_lm, calib, table, feats):
    again = extract_features(tiny_lm, calib, table)
    np.testing.assert_array_equal(again.values, feats.values)


def test_features_cli_json(capsys, tiny_folder, tmp_path):
    out, csv_path, cands = tmp_path / "f.json", tmp_path / "f.csv", tmp_path / "c.json"
    npz = tmp_path / "calib.npz"
    code = main(["features", "--model", str(tiny_folder), "--ctx", "64", "--calib-windows", "2",
                 "--fisher-windows", "1", "--json", str(out), "--csv", str(csv_path),
                 "--candidates", str(cands), "--save-calibration", str(npz), "--no-progress"])
    stdout = capsys.readouterr().out
    assert code == 0 and "blk.0.ffn_down.weight" in stdout and "nats/token" in stdout
    payload = json.loads(out.read_text())
    assert payload["version"] == FEATURE_SPEC_VERSION
    assert payload["feature_names"] == list(FEATURE_NAMES)
    assert len(payload["tensors"]) == 15
    t0 = payload["tensors"][0]
    assert t0["name"] == "token_embd.weight" and set(t0["features"]) == set(FEATURE_NAMES)
    assert all(isinstance(v, float) for v in t0["features"].values())
    assert payload["calibration"]["windows"] == 2 and payload["calibration"]["text"]["calib_ids"]
    assert csv_path.read_text().startswith("tensor,")
    assert len(json.loads(cands.read_text())["tensors"]) == 15
    # the saved calibration is reused
    code = main(["features", "--model", str(tiny_folder), "--calibration", str(npz),
                 "--json", str(out), "--no-progress"])
    assert code == 0 and json.loads(out.read_text())["tensors"][0]["name"] == "token_embd.weight"


@pytest.mark.parametrize("argv, message", [
    (["--calib-windows", "0"], "need at least one calibration window"),
    (["--fisher-windows", "-1"], "fisher_windows must be >= 0, got fisher_windows=-1"),
    (["--calib-windows", "100000"], "need calib=100000"),
    (["--calibration", "/nonexistent.npz"], "not a calibration file"),
])
def test_features_cli_bad_input(capsys, tiny_folder, argv, message):
    code = main(["features", "--model", str(tiny_folder), "--ctx", "64", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_smollm2_features(smollm2, smol_tokenizer):
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=128).split(calib=2, eval=0).calib
    c = calibrate(smollm2, w, fisher_windows=1, progress=False)
    t = build_candidates(smollm2, c, formats=("Q8_0", "Q4_0"), progress=False)
    f = extract_features(smollm2, c, t)
    assert f.values.shape == (211, len(FEATURE_NAMES)) and np.isfinite(f.values).all()
    assert f.raw["blk.3.ffn_down.weight"]["act_outlier_frac"] >= 0


@pytest.fixture(scope="module")
def untied_lm(tiny_folder, tmp_path_factory):
    """The tiny llama with a separate output head."""
    import shutil

    import torch
    import transformers

    from autobits.model import load_model

    cfg = transformers.AutoConfig.from_pretrained(tiny_folder)
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("tiny-untied")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for f in tiny_folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return load_model(folder)


def test_untied_head(untied_lm, smol_tokenizer):
    lm = untied_lm
    assert "output.weight" in {s.name for s in lm.quantizable}
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=32).split(calib=2, eval=0).calib
    c = calibrate(lm, w, fisher_windows=1, progress=False)
    assert not c.tied and c.tensor_site["output.weight"] == "output_in"
    assert c.importance("token_embd.weight") is None  # one-hot input: no imatrix
    np.testing.assert_array_equal(c.hessian("output.weight"), c.head_hessian())
    assert c.gain("output.weight") is c.head_gain
    t = build_candidates(lm, c, formats=("Q8_0", "Q4_0"), imatrix=True, progress=False)
    f = extract_features(lm, c, t)
    emb, out = f.row("token_embd.weight"), f.row("output.weight")
    assert emb["act_absmean"] == emb["act_kurtosis"] == emb["act_outlier_frac"] == 0.0
    assert out["depth"] == 1.0 and out["role_output"] == 1.0 and emb["role_token_embd"] == 1.0
    assert all(x.error > 0 for o in t.options.values() for x in o if x.fmt == "Q4_0")
