"""`autobits search` end to end on the tiny model: run directory, report, GGUF export."""

import json

import pytest

from autobits.app.cli import main

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
    # held-out numbers are llama.cpp's numerics unless --numerics float
    assert metrics["numerics"] == "llama" and "llama.cpp's CPU activation rounding" in printed.out
    assert "held-out numerics: llama.cpp" in (out / "report.md").read_text()
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
    # 3 calibration windows left after the reward one: the selection slice (1 would give no
    # interval, and the warm start would be kept unexamined)
    code = main(["search", "--model", str(tiny_folder), *TINY, "--calib-windows", "4",
                 "--target-bpw", "6", "--agent", "optuna", "--evals", "4", "--workers", "0",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["agent"] == "optuna" and "gguf" not in metrics
    # the selection: every candidate's paired interval against the warm start (greedy)
    sel = metrics["selection"]
    assert sel["level"] == 0.95 and sel["method"] == "t" and sel["reason"]
    assert len(metrics["window_kld"]) == metrics["windows"]
    for row in sel["rows"]:
        d = row["vs_warm_start"]
        assert (d is None) == row["warm_start"], row
        if d is not None:
            assert d["lo"] <= d["diff"] <= d["hi"] and d["n"] == row["windows"] == 3
            assert (sel["chosen"] == row["label"]) == (d["hi"] < 0)
    md = (out / "report.md").read_text()
    assert "## Selection" in md and "| KLD vs warm start | 95% interval (t) |" in md


@pytest.mark.parametrize("argv, message", [
    (["--target-bpw", "6", "--gguf", "/nonexistent/dir/x.gguf"], "output folder '/nonexistent/dir' does not exist"),
    (["--target-bpw", "0.5"], "feasible"),
])
def test_search_bad_input(tiny_folder, tmp_path, capsys, argv, message):
    code = main(["search", "--model", str(tiny_folder), *TINY, "--out", str(tmp_path / "r"), *argv])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r" / "allocation.json").exists()


def test_search_fold_gguf_and_export_fold_write_the_same_file(tiny_folder, tmp_path, capsys):
    """One prepare and one fold rule: `search --fold --imatrix --gguf` and `export --fold
    --imatrix` of the allocation it found write byte-identical files."""
    out = tmp_path / "run"
    searched = tmp_path / "searched.gguf"
    code = main(["search", "--model", str(tiny_folder), *TINY, "--target-bpw", "5",
                 "--agent", "greedy", "--fold", "--imatrix", "--out", str(out),
                 "--gguf", str(searched)])
    assert code == 0, capsys.readouterr().err[-2000:]
    exported = tmp_path / "exported.gguf"
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(out / "allocation.json"),
                 "--ctx", "64", "--calib-windows", "2", "--fold", "--imatrix",
                 "--gguf", str(exported)])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert searched.read_bytes() == exported.read_bytes()
    # and without folding the file differs (the test can tell files apart)
    plain = tmp_path / "plain.gguf"
    assert main(["export", "--model", str(tiny_folder), "--allocation", str(out / "allocation.json"),
                 "--gguf", str(plain)]) == 0
    assert plain.read_bytes() != exported.read_bytes()


def test_search_library_call_matches_the_cli(tiny_folder, tmp_path, capsys):
    """`autobits.app.search` is what the CLI runs: same allocation and metrics, and a solver's
    outcome carries no fake search record."""
    from autobits.allocation import Budget
    from autobits.app import SearchConfig, search
    from autobits.pipeline import PrepareConfig

    cfg = SearchConfig(prepare=PrepareConfig(model=str(tiny_folder), ctx=64, calib_windows=2,
                                             eval_windows=1, reward_windows=1, reward_ctx=64),
                       budget=Budget(target_bpw=6), allocator="greedy", out=tmp_path / "lib")
    outcome = search(cfg)
    assert outcome.search is None and outcome.reward is not None
    assert "greedy" not in outcome.baselines and "ilp" in outcome.baselines
    assert set(outcome.baselines) <= {"uniform", "llamacpp", "ilp"}
    assert outcome.allocation.bytes <= outcome.limit_bytes
    code = main(["search", "--model", str(tiny_folder), *TINY, "--target-bpw", "6",
                 "--agent", "greedy", "--out", str(tmp_path / "cli")])
    assert code == 0, capsys.readouterr().err[-2000:]
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    lib = json.loads(outcome.paths["metrics"].read_text())
    assert cli["kld"] == lib["kld"] == outcome.heldout.kld
    assert json.loads((tmp_path / "cli" / "allocation.json").read_text())["tensors"] == \
        outcome.allocation.tensors
    assert not (tmp_path / "lib" / "best_kld.png").exists()  # a solver has no evaluations plot


def test_workers_are_accepted_by_every_allocator():
    """--workers/--address run the preparation on Ray whatever the allocator; SAC and the
    solvers then allocate in this process."""
    from autobits.app.workflow import make_allocator
    from autobits.cluster import RayOptions

    for name in ("greedy", "sac"):
        assert make_allocator(name, ray=RayOptions(workers=2)).name == name


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_search_with_workers_prepares_on_ray_bit_identically(tiny_folder, tmp_path, capsys, caplog):
    """`search --workers 2` runs calibration and the candidate table on 2 Ray actors: the
    same shards as the local threads, so the same table, allocation and held-out metrics,
    bit for bit."""
    import logging

    import ray

    args = ["search", "--model", str(tiny_folder), *TINY, "--target-bpw", "5", "--agent", "greedy"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    with caplog.at_level(logging.INFO, logger="autobits"):
        code = main([*args, "--workers", "2", "--out", str(tmp_path / "ray")])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "preparing on Ray: 2 stage actors" in caplog.text
    assert "2 shards on 2 remote workers" in caplog.text
    assert not ray.is_initialized()  # the embedded Ray stopped with the search
    local, remote = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("local", "ray"))
    assert remote["kld"] == local["kld"] and remote["ppl"] == local["ppl"]
    same = ("kld", "ppl", "top1", "bytes")
    assert {n: [b[k] for k in same] for n, b in remote["baselines"].items()} == \
        {n: [b[k] for k in same] for n, b in local["baselines"].items()}
    assert (json.loads((tmp_path / "ray" / "allocation.json").read_text())["tensors"]
            == json.loads((tmp_path / "local" / "allocation.json").read_text())["tensors"])


