"""Every input a user can get wrong ends the same way: the real CLI, in a subprocess, prints
exactly one line on stderr naming the input and what was expected, exits with code 2,
shows no traceback and leaves no new file behind.

The cases run on the tiny float llama of ``conftest.py`` (a Hugging Face folder) and on
small files made here; each case is one ``autobits`` process.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TINY_CTX = ["--ctx", "64", "--calib-windows", "2", "--windows", "1", "--reward-windows", "1",
            "--reward-ctx", "64"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_folder, smol_path):
    """The bad (and good) input files every case draws from, made once."""
    import safetensors.torch
    import torch

    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "corrupt.gguf").write_bytes(b"GGUF" + os.urandom(4000))
    (d / "not-a-model.gguf").write_bytes(b"this is text, not a GGUF file\n" * 10)
    (d / "truncated.gguf").write_bytes(Path(smol_path).read_bytes()[:300_000])
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("Only a few words here.\n")
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        folder = d / f"{name}-model"
        shutil.copytree(tiny_folder, folder)
        weights = folder / "model.safetensors"
        tensors = safetensors.torch.load_file(weights)
        key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
        tensors[key][0, 0] = value
        safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
    # a good allocation of the tiny model, and broken variants of it
    from autobits.allocation import Allocation
    from autobits.model import load_model

    lm = load_model(tiny_folder)
    good = Allocation.uniform(lm.name, lm.specs, "Q8_0", fallback=True)
    good.save(d / "good.json")
    payload = json.loads((d / "good.json").read_text())

    def variant(name: str, change) -> None:
        p = json.loads(json.dumps(payload))
        change(p)
        (d / name).write_text(json.dumps(p))

    down = next(n for n in payload["tensors"] if "ffn_down" not in n and "blk" in n)
    variant("other-model.json", lambda p: p.update(model="smollm2-135m", tensors={
        **p["tensors"], **{f"blk.{i}.attn_q.weight": "Q8_0" for i in range(2, 30)}}))
    variant("old-version.json", lambda p: p.update(version=999))
    variant("format-not-string.json", lambda p: p["tensors"].update({down: 4}))
    variant("meta-not-dict.json", lambda p: p.update(meta=["not", "a", "dict"]))
    variant("unknown-format.json", lambda p: p["tensors"].update({down: "Q9_9"}))
    variant("misfit-format.json", lambda p: p["tensors"].update({down: "Q4_K"}))  # rows of 64
    variant("unknown-tensor.json", lambda p: p["tensors"].update({"blk.99.attn_q.weight": "Q8_0"}))
    (d / "not-json.json").write_text("{ this is not json")
    (d / "garbage-policy.zip").write_bytes(b"PK\x03\x04" + os.urandom(500))
    (d / "a-file").write_text("a file, not a folder\n")
    return d


def _cases(d: Path, tiny: Path) -> list[tuple[str, list[str], str]]:
    """(case id, argv, a fragment the one stderr line must contain)."""
    t = str(tiny)
    return [
        ("missing model file", ["inspect", "--model", str(d / "nope.gguf")], "nope.gguf"),
        ("corrupt GGUF", ["inspect", "--model", str(d / "corrupt.gguf")], "corrupt.gguf"),
        ("not a GGUF", ["inspect", "--model", str(d / "not-a-model.gguf")], "not-a-model.gguf"),
        ("truncated GGUF", ["inspect", "--model", str(d / "truncated.gguf")], "truncated.gguf"),
        ("NaN weights", ["eval", "--model", str(d / "nan-model"), "--uniform", "Q8_0", *TINY_CTX[:2],
                         "--windows", "1"], "NaN"),
        ("Inf weights", ["eval", "--model", str(d / "inf-model"), "--uniform", "Q8_0", *TINY_CTX[:2],
                         "--windows", "1"], "Inf"),
        ("empty text file", ["eval", "--model", t, "--uniform", "Q8_0", "--text",
                             str(d / "empty.txt"), "--ctx", "64", "--windows", "1"], "empty.txt"),
        ("text shorter than a window", ["eval", "--model", t, "--uniform", "Q8_0", "--text",
                                        str(d / "short.txt"), "--ctx", "64", "--windows", "1"],
         "short.txt"),
        ("missing text file", ["eval", "--model", t, "--uniform", "Q8_0", "--text",
                               str(d / "nope.txt"), "--ctx", "64"], "nope.txt"),
        ("ctx above the trained context", ["eval", "--model", t, "--uniform", "Q8_0", "--ctx",
                                           "4096", "--windows", "1"], "context"),
        ("ctx too small", ["search", "--model", t, "--target-bpw", "6", "--ctx", "4",
                           "--out", str(d / "o1")], "ctx"),
        ("unknown format", ["eval", "--model", t, "--uniform", "Q9_9", "--ctx", "64"], "Q9_9"),
        ("unknown format in allocation", ["eval", "--model", t, "--allocation",
                                          str(d / "unknown-format.json"), "--ctx", "64"], "Q9_9"),
        ("shape-invalid format", ["eval", "--model", t, "--allocation",
                                  str(d / "misfit-format.json"), "--ctx", "64"], "Q4_K"),
        ("infeasible budget", ["search", "--model", t, *TINY_CTX, "--target-bpw", "0.5",
                               "--out", str(d / "o2")], "feasible"),
        ("no budget", ["search", "--model", t, *TINY_CTX, "--out", str(d / "o3")], "budget"),
        ("allocation for another model", ["eval", "--model", t, "--allocation",
                                          str(d / "other-model.json"), "--ctx", "64"],
         "does not have"),
        ("allocation schema version", ["eval", "--model", t, "--allocation",
                                       str(d / "old-version.json"), "--ctx", "64"], "version"),
        ("non-string format", ["eval", "--model", t, "--allocation",
                               str(d / "format-not-string.json"), "--ctx", "64"], "format"),
        ("non-dict meta", ["eval", "--model", t, "--allocation", str(d / "meta-not-dict.json"),
                           "--ctx", "64"], "meta"),
        ("unknown tensor", ["eval", "--model", t, "--allocation", str(d / "unknown-tensor.json"),
                            "--ctx", "64"], "blk.99.attn_q.weight"),
        ("allocation not JSON", ["eval", "--model", t, "--allocation", str(d / "not-json.json"),
                                 "--ctx", "64"], "not-json.json"),
        ("missing allocation", ["export", "--model", t, "--allocation", str(d / "nope.json"),
                                "--gguf", str(d / "x.gguf")], "nope.json"),
        ("corrupt policy", ["allocate", "--policy", str(d / "garbage-policy.zip"), "--model", t,
                            *TINY_CTX, "--target-bpw", "6", "--out", str(d / "o4")],
         "garbage-policy.zip"),
        ("missing output folder", ["export", "--model", t, "--allocation", str(d / "good.json"),
                                   "--gguf", str(d / "no" / "such" / "x.gguf")], "does not exist"),
        # /proc refuses new files even to root (a chmod'ed folder would not stop root)
        ("unwritable output folder", ["export", "--model", t, "--allocation", str(d / "good.json"),
                                      "--gguf", "/proc/autobits-x.gguf"], "output folder '/proc' is not writable"),
        ("output folder is a file", ["search", "--model", t, *TINY_CTX, "--target-bpw", "6",
                                     "--out", str(d / "a-file" / "run")], "a-file"),
        ("export without a target", ["export", "--model", t, "--allocation",
                                     str(d / "good.json")], "--gguf"),
        ("sac with one evaluation", ["search", "--model", t, *TINY_CTX, "--target-bpw", "6",
                                     "--agent", "sac", "--evals", "1", "--out", str(d / "o5")],
         "evals"),
        ("no Ray with an address", ["search", "--model", t, *TINY_CTX, "--target-bpw", "6",
                                    "--agent", "greedy", "--workers", "0", "--address",
                                    "127.0.0.1:1", "--out", str(d / "o6")], "--workers 0"),
        ("negative workers", ["search", "--model", t, *TINY_CTX, "--target-bpw", "6",
                              "--agent", "optuna", "--workers", "-1", "--out", str(d / "o7")],
         "--workers"),
        ("bad bpw range", ["train-policy", "--models", t, "--bpw-range", "6:4", "--out",
                           str(d / "p.zip"), "--ctx", "64"], "--bpw-range"),
        ("unparsable option value", ["search", "--model", t, "--target-bpw", "six", "--out",
                                     str(d / "o8")], "six"),
        ("zero held-out windows", ["eval", "--model", t, "--uniform", "Q8_0", "--windows", "0"],
         "--windows"),
    ]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _run(argv: list[str], cwd: Path, *, fsize: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def limit():  # a full disk, simulated: writes past ``fsize`` bytes fail with EFBIG
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "autobits.app.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=limit)


def _check(proc: subprocess.CompletedProcess, fragment: str, case: str) -> str:
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{case}: traceback\n{proc.stderr[-3000:]}"
    assert len(err_lines) == 1, f"{case}: {len(err_lines)} stderr lines\n{proc.stderr[-3000:]}"
    assert fragment in err_lines[0], f"{case}: {fragment!r} not in {err_lines[0]!r}"
    return err_lines[0]


def test_bad_inputs_one_line_exit_2_nothing_written(inputs, tiny_folder, tmp_path):
    cases = _cases(inputs, tiny_folder)
    assert len(cases) >= 25
    seen: dict[str, str] = {}
    failures = []
    for case, argv, fragment in cases:
        before = _files(inputs) | _files(tmp_path)
        proc = _run(argv, tmp_path)
        try:
            seen[case] = _check(proc, fragment, case)
            new = (_files(inputs) | _files(tmp_path)) - before
            assert not new, f"{case}: left {sorted(map(str, new))}"
        except AssertionError as e:
            failures.append(str(e))
    print("\n".join(f"{c}: {line}" for c, line in seen.items()))
    assert not failures, "\n\n".join(failures)


def test_full_disk_leaves_nothing_behind(inputs, tiny_folder, tmp_path):
    """A write that fails part-way (the file size limit stands in for a full disk) is one
    line naming the file, exit 2, and no partial GGUF or temporary file."""
    out = tmp_path / "big.gguf"
    proc = _run(["export", "--model", str(tiny_folder), "--allocation", str(inputs / "good.json"),
                 "--gguf", str(out)], tmp_path, fsize=64 * 1024)
    line = _check(proc, "big.gguf", "full disk")
    assert "too large" in line.lower() or "space" in line.lower(), line
    assert not list(tmp_path.iterdir()), sorted(tmp_path.iterdir())
