"""Saved policies: multi-model training, save/load round trip, zero-shot allocation, refusal of
a foreign feature spec, and the train-policy / allocate commands (measurement stubbed)."""

from __future__ import annotations

import types
import zipfile

import numpy as np
import pytest

from autobits.agents.policy import (
    PolicyError,
    PolicySpecError,
    load_policy,
    train_policy,
)
from autobits.envs import AllocTask
from autobits.errors import AutobitsError

from test_env import FakeFeatures, llama_specs, problem, synthetic_features, synthetic_table

SAC_TINY = {"net_arch": (32, 32), "batch_size": 32, "gradient_steps": 4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    t1, f1, _ = problem(2, seed=1, model="a")
    t2, f2, _ = problem(3, seed=2, model="b")
    policy = train_policy([AllocTask(t1, f1), AllocTask(t2, f2)], bpw_range=(4.8, 6.0), steps=300,
                          seed=0, sac_options=SAC_TINY)
    path = policy.save(tmp_path_factory.mktemp("policy") / "policy.zip")
    return policy, path


def test_policy_file_carries_everything(trained):
    policy, path = trained
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"policy.json", "sb3_model.zip"}
    loaded = load_policy(path)
    assert loaded.feature_spec == {"version": 1, "names": ["depth", "token_embd", "attn_q", "attn_k",
                                                           "attn_v", "attn_output", "ffn_gate",
                                                           "ffn_up", "ffn_down"]}
    assert loaded.config["formats"][0] == "F16" and "Q4_K" in loaded.config["formats"]
    assert loaded.config["env"]["action"] == "absolute"
    assert loaded.meta["trained_on"] == ["a", "b"] and loaded.meta["bpw_range"] == [4.8, 6.0]
    np.testing.assert_array_equal(loaded.obs_mean, policy.obs_mean)
    np.testing.assert_array_equal(loaded.obs_var, policy.obs_var)
    assert len(loaded.obs_mean) == len(loaded.config["obs_names"])


def test_round_trip_allocates_identically_and_feasibly(trained):
    policy, path = trained
    table = synthetic_table(llama_specs(4), seed=9, model="unseen")  # a model it never saw
    feats = synthetic_features(table)
    loaded = load_policy(path)
    for bpw in (4.9, 5.5):
        limit = int(bpw * table.params // 8)
        a, b = policy.allocate(table, feats, limit_bytes=limit), loaded.allocate(table, feats, limit_bytes=limit)
        assert a.tensors == b.tensors
        assert b.bytes <= limit
        assert b.meta["method"] == "policy" and b.meta["policy"] == str(path)


def test_foreign_feature_spec_is_refused(trained):
    _, path = trained
    loaded = load_policy(path)
    table, feats, limit = problem(seed=4)
    newer = synthetic_features(table, version=2)
    with pytest.raises(PolicySpecError, match="feature spec version 1 .* version 2") as e:
        loaded.allocate(table, newer, limit_bytes=limit)
    assert isinstance(e.value, AutobitsError)
    renamed = FakeFeatures(feats.model, feats.names, ("x",) + feats.feature_names[1:], feats.values)
    with pytest.raises(PolicySpecError, match=r"missing \['depth'\], extra \['x'\]"):
        loaded.allocate(table, renamed, limit_bytes=limit)


def test_unseen_formats_are_refused(trained):
    _, path = trained
    table = synthetic_table(llama_specs(2), seed=1, model="c", formats=("F16", "Q8_0", "F32"))
    with pytest.raises(PolicySpecError, match=r"never saw: \['F32'\]"):
        load_policy(path).allocate(table, synthetic_features(table),
                                   limit_bytes=int(12 * table.params // 8))


def test_bad_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.zip")
    (tmp_path / "junk.zip").write_text("not a zip")
    with pytest.raises(PolicyError, match="unreadable"):
        load_policy(tmp_path / "junk.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("data", "x")
    with pytest.raises(PolicyError, match="not an autobits policy"):
        load_policy(tmp_path / "other.zip")


# ------------------------------------------------------------------------------ CLI


def _stub_measure(monkeypatch, *, version=1):
    """Replace the slow model measurement of the agents commands by a synthetic model."""
    import autobits.app.commands.agents as cmd
    from autobits.specs import DEFAULT_CANDIDATES

    from test_env import fake_evaluate

    def measure(model, args, *, eval_windows):
        table, _, _ = problem(3, seed=len(model), model=model)
        feats = synthetic_features(table, version=version)
        ev = fake_evaluate(table)
        return types.SimpleNamespace(
            lm=types.SimpleNamespace(name=model, specs=table.specs), table=table, features=feats,
            config=types.SimpleNamespace(formats=DEFAULT_CANDIDATES), reward=ev, heldout=ev,
            split=types.SimpleNamespace(to_json=lambda: {"corpus": "stub"}), timings={"load": 0.0},
        )

    monkeypatch.setattr(cmd, "_measure", measure)


def test_train_policy_and_allocate_commands(tmp_path, monkeypatch, capsys):
    import json

    from autobits.app.cli import main

    _stub_measure(monkeypatch)
    out = tmp_path / "p.zip"
    assert main(["train-policy", "--models", "m1,m22", "--bpw-range", "4.8:6", "--out", str(out),
                 "--steps", "120", "--gradient-steps", "2"]) == 0
    assert load_policy(out).meta["trained_on"] == ["m1", "m22"]
    run = tmp_path / "run"
    assert main(["allocate", "--policy", str(out), "--model", "m333", "--target-bpw", "5.25",
                 "--out", str(run)]) == 0
    alloc = json.loads((run / "allocation.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert alloc["meta"]["method"] == "policy" and metrics["bytes"] == alloc["bytes"]
    assert alloc["bytes"] <= int(5.25 * alloc["params"] // 8)
    assert "KLD" in capsys.readouterr().out


def test_allocate_refuses_foreign_spec_with_exit_2(trained, tmp_path, monkeypatch, capsys):
    from autobits.app.cli import main

    _stub_measure(monkeypatch, version=7)
    code = main(["allocate", "--policy", str(trained[1]), "--model", "m", "--target-bpw", "5",
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "feature spec version 1" in err and "version 7" in err
    assert not (tmp_path / "run" / "allocation.json").exists()
    assert main(["allocate", "--policy", str(tmp_path / "nope.zip"), "--model", "m",
                 "--target-bpw", "5", "--out", str(tmp_path / "run")]) == 2
    assert main(["train-policy", "--models", "m", "--bpw-range", "6:4", "--out",
                 str(tmp_path / "x.zip")]) == 2


@pytest.mark.slow
def test_train_policy_and_allocate_end_to_end_on_tiny_model(tiny_folder, tmp_path, capsys):
    """The real pipeline (text, calibration, candidates, features, held-out evaluation)."""
    import json

    from autobits.app.cli import main

    small = ["--ctx", "64", "--calib-windows", "2", "--reward-windows", "1", "--reward-ctx", "32"]
    policy = tmp_path / "tiny.zip"
    assert main(["train-policy", "--models", str(tiny_folder), "--bpw-range", "5:7", "--out",
                 str(policy), "--steps", "100", "--gradient-steps", "2", *small]) == 0
    assert main(["allocate", "--policy", str(policy), "--model", str(tiny_folder),
                 "--target-bpw", "5.5", "--out", str(tmp_path / "run"), "--windows", "1",
                 *small]) == 0
    alloc = json.loads((tmp_path / "run" / "allocation.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert alloc["bpw"] <= 5.5 and metrics["bytes"] == alloc["bytes"] and metrics["kld"] >= 0
