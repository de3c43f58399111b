"""CLI: readable output, JSON beside, and exit code 2 with one line for bad input."""

import json

import numpy as np
import pytest

from autobits.app.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_tiny_writes_json(capsys, tiny_folder, tmp_path):
    out = tmp_path / "m.json"
    code, stdout, _ = _run(capsys, "eval", "--model", str(tiny_folder), "--uniform", "Q8_0",
                           "--ctx", "64", "--windows", "2", "--json", str(out))
    assert code == 0 and "KLD" in stdout and "uniform Q8_0" in stdout
    m = json.loads(out.read_text())
    assert {"kld", "ppl", "top1", "bytes", "bpw", "seconds"} <= set(m)
    assert m["kld"] > 0 and m["text"]["eval_ids"]


def test_eval_allocation_file(capsys, tiny_lm, tiny_folder, tmp_path):
    from autobits.allocation import Allocation

    path = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0").save(tmp_path / "a.json")
    code, stdout, _ = _run(capsys, "eval", "--model", str(tiny_folder), "--allocation", str(path),
                           "--ctx", "64", "--windows", "1")
    assert code == 0 and "a.json" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/nonexistent/model.gguf"], "neither a built-in name"),
        (["eval", "--uniform", "Q7_X", "--ctx", "64", "--windows", "1"], "unknown format 'Q7_X'"),
        (["eval", "--text", "/nonexistent.txt", "--ctx", "64", "--windows", "1"], "nonexistent.txt"),
        (["inspect", "--target-bpw", "1.0"], "below the smallest possible file"),
    ],
)
def test_bad_input_exit_2(capsys, tiny_folder, argv, message):
    argv = [a for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_folder)]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_allocation_with_unknown_tensor(capsys, tiny_folder, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"version": 1, "model": "x", "tensors": {"blk.99.attn_q.weight": "Q4_0"}}))
    code, _, err = _run(capsys, "eval", "--model", str(tiny_folder), "--allocation", str(path),
                        "--ctx", "64", "--windows", "1")
    assert code == 2 and "blk.99.attn_q.weight" in err


def test_inspect_lists_tensors(capsys, tiny_folder, tmp_path):
    code, stdout, _ = _run(capsys, "inspect", "--model", str(tiny_folder), "--json", str(tmp_path / "i.json"))
    assert code == 0 and "blk.0.ffn_down.weight" in stdout and "Q4_K" in stdout
    payload = json.loads((tmp_path / "i.json").read_text())
    rows = {t["name"]: t for t in payload["tensors"]}
    # 2 blocks x 9, token_embd and output_norm (tied embeddings: no output.weight)
    assert len(rows) == len(payload["tensors"]) == 2 * 9 + 2 and "output.weight" not in rows
    down = rows["blk.0.ffn_down.weight"]
    assert down["shape"] == [64, 256] and down["role"] == "ffn_down" and down["block"] == 0
    assert "Q4_K" in down["valid_formats"]  # rows of 256 fit the K-quants
    assert "Q4_K" not in rows["blk.0.attn_q.weight"]["valid_formats"]  # rows of 64 do not
    assert payload["params"] == sum(int(np.prod(t["shape"])) for t in payload["tensors"])
