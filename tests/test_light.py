"""The light path (autobits.light, ``autobits light``) on the tiny llama exported to GGUF: the
same tensors, formats and exact bytes as the full path's candidate table, errors that grow as
formats shrink, a recipe within the budget, bad input refused before any slow work."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest

from autobits.allocation import Allocation
from autobits.app.cli import main
from autobits.calibrate import calibrate
from autobits.exports.gguf import export_gguf
from autobits.exports.recipe import read_recipe
from autobits.features import build_candidates
from autobits.formats import get_format
from autobits.imatrix import imatrix_from_calibration, read_imatrix, write_imatrix
from autobits.light import (
    ROLE_GAINS, WEIGHTED_SCALE, LightConfig, crest_factor, light_candidates, open_gguf,
    sample_rows, tensor_gain,
)  # fmt: skip
from autobits.errors import AutobitsError
from autobits.specs import DEFAULT_CANDIDATES
from autobits.text import load_text, make_windows

#: Chains of formats whose errors must grow left to right wherever all of them fit.
CHAINS = (("F16", "Q8_0", "Q5_0", "Q4_0"), ("Q8_0", "Q5_1", "Q4_1"),
          ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"))


@pytest.fixture(scope="module")
def f32_gguf(tiny_lm, tmp_path_factory):
    alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "F32")
    return export_gguf(tiny_lm, alloc, tmp_path_factory.mktemp("light") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def quant_gguf(tiny_lm, tmp_path_factory):
    """The tiny model with quantized tensors (K-quants where rows allow, legacy elsewhere)."""
    tensors = {s.name: ("Q4_K" if s.row_length % 256 == 0 else ("Q8_0", "Q5_1", "IQ4_NL")[i % 3])
               for i, s in enumerate(tiny_lm.quantizable)}
    alloc = Allocation.build(tiny_lm.name, tiny_lm.specs, tensors)
    return export_gguf(tiny_lm, alloc, tmp_path_factory.mktemp("light") / "tiny-mixed.gguf")


@pytest.fixture(scope="module")
def calib(tiny_lm, smol_tokenizer):
    w = make_windows(load_text("stdlib"), smol_tokenizer, ctx=64).split(calib=2, eval=0).calib
    return calibrate(tiny_lm, w, fisher_windows=0, progress=False)


@pytest.fixture(scope="module")
def imatrix_file(tiny_lm, calib, tmp_path_factory):
    path = tmp_path_factory.mktemp("light") / "tiny.imatrix.gguf"
    return write_imatrix(path, imatrix_from_calibration(calib, tiny_lm.specs))


@pytest.fixture(scope="module")
def light(f32_gguf, imatrix_file):
    return light_candidates(model=f32_gguf, imatrix=imatrix_file)


def test_reader_finds_every_tensor_and_its_rows(tiny_lm, f32_gguf, quant_gguf):
    """open_gguf's offsets, shapes and types are gguf-py's; rows read from the map are the
    reference weights (F32) and gguf-py's dequantization (quantized types)."""
    for path in (f32_gguf, quant_gguf):
        weights = open_gguf(path)
        reader = gguf.GGUFReader(path)
        assert set(weights.tensors) == {t.name for t in reader.tensors}
        for t in reader.tensors:
            mine = weights.tensors[t.name]
            assert mine.start == t.data_offset and mine.nbytes == t.n_bytes
            assert mine.type_name == t.tensor_type.name
            assert mine.shape == tuple(int(x) for x in reversed(t.shape.tolist()))
            if len(mine.shape) == 2:
                idx = np.array([0, mine.n_rows // 2, mine.n_rows - 1])
                want = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(mine.shape)
                assert np.array_equal(weights.read_rows(t.name, idx), want[idx]), t.name
    weights = open_gguf(f32_gguf)
    w = tiny_lm.reference_weight("blk.1.ffn_down.weight").numpy()
    assert np.array_equal(weights.read_rows("blk.1.ffn_down.weight", np.arange(5)), w[:5])
    assert weights.tied and weights.architecture == "llama"


def test_light_table_matches_the_full_path(tiny_lm, calib, light):
    """Same tensors in the same order, the same candidate formats and exact bytes."""
    full = build_candidates(tiny_lm, calib, formats=DEFAULT_CANDIDATES, progress=False)
    assert light.tensors == full.tensors
    assert [s.name for s in light.specs] == [s.name for s in full.specs]
    assert [(s.shape, s.role, s.block, s.quantizable) for s in light.specs] == \
        [(s.shape, s.role, s.block, s.quantizable) for s in full.specs]
    for name in full.tensors:
        assert [(c.fmt, c.bytes) for c in light.options[name]] == \
            [(c.fmt, c.bytes) for c in full.options[name]], name
    assert (light.fixed_bytes, light.min_bytes(), light.max_bytes()) == \
        (full.fixed_bytes, full.min_bytes(), full.max_bytes())
    assert light.meta["light"] and light.meta["weighting"] == "imatrix"


@pytest.mark.parametrize("weighted", [True, False])
def test_errors_grow_as_formats_shrink(f32_gguf, imatrix_file, light, weighted):
    table = light if weighted else light_candidates(model=f32_gguf)
    for name in table.tensors:
        err = {c.fmt: c.error for c in table.options[name]}
        for chain in CHAINS:
            fit = [f for f in chain if f in err]
            assert all(err[a] < err[b] for a, b in zip(fit, fit[1:])), (name, fit, err)
        bpw = np.array([get_format(f).bits_per_weight for f in err])
        assert np.corrcoef(bpw, np.log(np.array(list(err.values())) + 1e-30))[0, 1] < -0.8


def test_sample_is_deterministic_and_bounded(f32_gguf, light):
    cfg = LightConfig(rows=40, max_values=64 * 40, min_rows=8)
    a, b = (light_candidates(model=f32_gguf, config=cfg, workers=w) for w in (1, 2))
    assert a.options == b.options
    assert a.meta["rows_read"] < light.meta["rows_read"]
    rows = sample_rows(1000, 64, "blk.0.attn_q.weight", cfg)
    assert len(rows) == 40 and np.all(np.diff(rows) > 0) and rows[-1] < 1000
    assert np.array_equal(rows, sample_rows(1000, 64, "blk.0.attn_q.weight", cfg))
    assert not np.array_equal(rows, sample_rows(1000, 64, "blk.0.attn_k.weight", cfg))
    assert len(sample_rows(1000, 4096, "x", cfg)) == 8  # long rows: min_rows
    assert len(sample_rows(5, 64, "x", cfg)) == 5  # a small tensor is read whole
    with pytest.raises(AutobitsError, match="rows"):
        LightConfig(rows=0)
    with pytest.raises(AutobitsError, match="unknown format"):
        LightConfig(formats=("Q4_0", "Q9_9"))


def test_gains(tiny_lm):
    """The gain table: the crest factor multiplies a vector's gain; a tied embedding is the
    lookup plus the head; without an imatrix the second column; ungained: 1."""
    vec = np.ones(64, np.float32)
    vec[3] = 400.0
    assert crest_factor(vec) == pytest.approx(20.0)
    q, embd = tiny_lm.spec("blk.0.attn_q.weight"), tiny_lm.spec("token_embd.weight")
    assert tensor_gain(q, vec, weighted=True, tied=True) == pytest.approx(ROLE_GAINS["attn_q"][0] * 20)
    assert tensor_gain(q, None, weighted=True, tied=True) == pytest.approx(
        ROLE_GAINS["attn_q"][1] * WEIGHTED_SCALE)
    assert tensor_gain(q, None, weighted=False, tied=True) == ROLE_GAINS["attn_q"][1]
    assert tensor_gain(embd, vec, weighted=True, tied=True) == pytest.approx(
        ROLE_GAINS["token_embd"][1] * WEIGHTED_SCALE + ROLE_GAINS["output"][0] * 20)
    assert tensor_gain(embd, None, weighted=False, tied=False) == ROLE_GAINS["token_embd"][1]


def _budget(table) -> int:
    return (table.min_bytes() + table.max_bytes()) // 2


def test_cli_writes_a_recipe_within_the_budget(f32_gguf, imatrix_file, light, tmp_path, capsys):
    limit = _budget(light)
    recipe, alloc_path = tmp_path / "recipe.txt", tmp_path / "alloc.json"
    code = main(["light", "--model", str(f32_gguf), "--max-bytes", str(limit), "--imatrix",
                 str(imatrix_file), "--recipe", str(recipe), "--json", str(alloc_path)])
    out = capsys.readouterr().out
    assert code == 0 and "peak memory" in out and str(recipe) in out
    by_name = {s.name: s for s in light.specs}
    total, named = light.fixed_bytes, set()
    for pattern, tname in read_recipe(recipe):
        name = re.sub(r"\\(.)", r"\1", pattern[1:-1])
        spec = by_name[name]
        fmt = get_format(tname).name
        assert spec.quantizable and fmt in spec.valid_formats(DEFAULT_CANDIDATES), (name, fmt)
        total += spec.nbytes(fmt)
        named.add(name)
    assert named == set(light.tensors) and total <= limit
    alloc = Allocation.load(alloc_path, light.specs, light.model)
    assert alloc.bytes == total and alloc.meta["light"]["weighting"] == "imatrix"
    args = (tmp_path / "recipe.txt.args").read_text().split()
    assert args[-2:] == ["--tensor-type-file", str(recipe)]


@pytest.mark.needs("llama_cpp")
def test_cli_gguf_is_written_by_llama_cpp_with_the_recipe(f32_gguf, imatrix_file, light, tmp_path):
    out = tmp_path / "light.gguf"
    code = main(["light", "--model", str(f32_gguf), "--max-bytes", str(_budget(light)),
                 "--imatrix", str(imatrix_file), "--recipe", str(tmp_path / "r.txt"),
                 "--json", str(tmp_path / "a.json"), "--gguf", str(out)])
    assert code == 0
    alloc = Allocation.load(tmp_path / "a.json", light.specs, light.model)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {n: types[n] for n in alloc.tensors} == alloc.tensors
    assert sum(int(t.n_bytes) for t in gguf.GGUFReader(out).tensors) == alloc.bytes


def test_bad_input_exits_2_before_work(f32_gguf, quant_gguf, imatrix_file, tiny_folder, light,
                                       tmp_path, capsys):
    ok = ["--max-bytes", str(_budget(light)), "--recipe", str(tmp_path / "r.txt")]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(f32_gguf.read_bytes()[:-1000])
    other = tmp_path / "other.imatrix.gguf"
    imx = read_imatrix(imatrix_file)
    write_imatrix(other, type(imx)(sums={"blk.9.attn_q.weight": np.ones(64, np.float32)},
                                   counts={"blk.9.attn_q.weight": np.ones(1, np.float32)}))
    cases = [
        (["--model", str(tmp_path / "missing.gguf"), *ok], "missing.gguf"),
        (["--model", str(tiny_folder), *ok], "light path reads GGUF files"),
        (["--model", str(truncated), *ok], "truncated"),
        (["--model", str(quant_gguf), *ok], "--allow-requantize"),
        (["--model", str(f32_gguf), *ok, "--imatrix", str(other)], "does not have"),
        (["--model", str(f32_gguf), *ok, "--imatrix", str(tmp_path / "no.dat")], "does not exist"),
        (["--model", str(f32_gguf), "--max-bytes", "1000", "--recipe", str(tmp_path / "r.txt")],
         "feasible range"),
        (["--model", str(f32_gguf), *ok[:2], "--recipe", str(tmp_path / "no" / "r.txt")],
         "does not exist"),
        (["--model", str(f32_gguf), *ok, "--rows", "0"], "positive count"),
        (["--model", str(f32_gguf), *ok, "--workers", "0"], "--workers"),
        (["--model", str(f32_gguf), "--recipe", str(tmp_path / "r.txt")], "--target-bpw"),
    ]
    for argv, fragment in cases:
        try:
            code = main(["light", *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1 and fragment in err[0], (argv, code, err)
        assert not (tmp_path / "r.txt").exists()


def test_eval_rounds_with_an_imatrix_file(tiny_lm, tiny_folder, imatrix_file, tmp_path, capsys):
    """``autobits eval --imatrix FILE`` measures an allocation rounded as llama-quantize
    --imatrix rounds it (what a light recipe is applied with)."""
    path = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0").save(tmp_path / "q4.json")
    base = ["eval", "--model", str(tiny_folder), "--allocation", str(path), "--ctx", "64",
            "--windows", "2"]
    assert main([*base, "--json", str(tmp_path / "plain.json")]) == 0
    assert main([*base, "--imatrix", str(imatrix_file), "--json", str(tmp_path / "imx.json")]) == 0
    assert "rounded with imatrix" in capsys.readouterr().out
    plain, imx = (json.loads((tmp_path / f).read_text()) for f in ("plain.json", "imx.json"))
    assert imx["imatrix"] == str(imatrix_file) and plain["imatrix"] is None
    assert imx["kld"] != plain["kld"] and imx["bytes"] == plain["bytes"]
    assert main([*base, "--imatrix", str(imatrix_file), "--fold"]) == 2
