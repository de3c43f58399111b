"""`autobits search` end to end on the tiny model: run directory, report, GGUF export."""

import json

import pytest

from autobits.cli import main

TINY = ["--ctx", "64", "--calib-windows", "2", "--windows", "1", "--reward-windows", "1",
        "--reward-ctx", "64"]


def test_greedy_search_exports_a_gguf(tiny_folder, tmp_path, capsys):
    import gguf

    out = tmp_path / "run"
    code = main(["search", "--model", str(tiny_folder), *TINY, "--target-bpw", "6",
                 "--agent", "greedy", "--out", str(out), "--gguf"])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    alloc = json.loads((out / "allocation.json").read_text())
    assert metrics["agent"] == "greedy" and metrics["bpw"] <= 6.0
    path = out / metrics["gguf"].split("/")[-1]
    assert path.is_file() and str(path) in printed.out and "report.md" in printed.out
    assert (out / "report.md").is_file()
    # every tensor in the file has its allocated type
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for name, fmt in alloc["tensors"].items():
        assert types[name] == fmt, name
    # the baselines at the same budget are in the printed table
    assert "uniform" in printed.out and "ilp" in printed.out


def test_optuna_search_in_process(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["search", "--model", str(tiny_folder), *TINY, "--target-bpw", "6",
                 "--agent", "optuna", "--evals", "4", "--workers", "0", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert json.loads((out / "metrics.json").read_text())["agent"] == "optuna"
    assert (out / "report.md").is_file() and "gguf" not in json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("argv, message", [
    (["--target-bpw", "6", "--gguf", "/nonexistent/dir/x.gguf"], "output folder '/nonexistent/dir' does not exist"),
    (["--target-bpw", "0.5"], "feasible"),
])
def test_search_bad_input(tiny_folder, tmp_path, capsys, argv, message):
    code = main(["search", "--model", str(tiny_folder), *TINY, "--out", str(tmp_path / "r"), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r" / "allocation.json").exists()
