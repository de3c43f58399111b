"""Saved policies: multi-model training, save/load round trip, zero-shot allocation, refusal of
a foreign feature spec, refusal of pickled (format-1) policies, and the train-policy /
allocate commands (measurement stubbed)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import types
import zipfile

import numpy as np
import pytest

from autobits.agents.policy import (
    MANIFEST_KEY,
    POLICY_FORMAT_VERSION,
    PolicyError,
    PolicySpecError,
    convert_policy,
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
    path = policy.save(tmp_path_factory.mktemp("policy") / "policy.safetensors")
    return policy, path


def test_policy_file_carries_everything(trained):
    from safetensors import safe_open

    policy, path = trained
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    assert {"obs_rms.mean", "obs_rms.var", "log_ent_coef"} <= keys
    assert any(k.startswith("policy.actor.") for k in keys)
    assert any(k.startswith("policy.critic.") for k in keys)
    assert manifest["format"] == POLICY_FORMAT_VERSION == 2
    arch = manifest["architecture"]
    assert arch["net_arch"] == [32, 32] and arch["activation"] == "ReLU"
    assert arch["observation_shape"] == [len(manifest["obs_names"])] and arch["action_shape"] == [1]
    assert set(manifest["versions"]) == {"autobits", "stable_baselines3", "torch"}
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


def test_round_trip_gives_identical_actions(trained):
    """The network rebuilt from the manifest acts exactly as the trained one."""
    policy, path = trained
    loaded = load_policy(path)
    obs = np.random.default_rng(0).normal(size=(64, len(policy.obs_mean))).astype(np.float32)
    a, _ = policy.network().predict(policy.normalize(obs), deterministic=True)
    b, _ = loaded.network().predict(loaded.normalize(obs), deterministic=True)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) > 1  # a policy that acts, not a constant
    assert loaded.to_bytes() == load_policy(loaded.save(path.with_name("again.safetensors"))).to_bytes()


def test_bad_policy_files(trained, tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a policy")
    with pytest.raises(PolicyError, match="unreadable"):
        load_policy(tmp_path / "junk.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PolicyError, match="not an autobits policy"):
        load_policy(tmp_path / "other.safetensors")
    # a manifest with a field missing, or weights that do not fit its architecture
    from safetensors import safe_open
    from safetensors.torch import save_file as save_torch

    with safe_open(str(trained[1]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    bad = {k: v for k, v in manifest.items() if k != "obs_count"}
    save_torch(tensors, str(tmp_path / "nocount.safetensors"), metadata={MANIFEST_KEY: json.dumps(bad)})
    with pytest.raises(PolicyError, match="lacks 'obs_count'"):
        load_policy(tmp_path / "nocount.safetensors")
    wide = {**manifest, "architecture": {**manifest["architecture"], "net_arch": [33, 32]}}
    save_torch(tensors, str(tmp_path / "wide.safetensors"), metadata={MANIFEST_KEY: json.dumps(wide)})
    with pytest.raises(PolicyError, match="do not match the architecture"):
        load_policy(tmp_path / "wide.safetensors").network()
    evil = {**manifest, "architecture": {**manifest["architecture"], "activation": "Module"}}
    save_torch(tensors, str(tmp_path / "act.safetensors"), metadata={MANIFEST_KEY: json.dumps(evil)})
    with pytest.raises(PolicyError, match="activation 'Module'"):
        load_policy(tmp_path / "act.safetensors").network()


class _Marker:
    """Unpickling this creates the marker file: what a malicious policy would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_zip(path, marker):
    """A format-1 policy zip whose SB3 model carries a code-running pickle in ``data``
    (cloudpickled values are base64 under ':serialized:') and as ``policy.pth``."""
    payload = pickle.dumps(_Marker(marker))
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("data", json.dumps({"policy_class": {
            ":type:": "<class 'abc.ABCMeta'>",
            ":serialized:": base64.b64encode(payload).decode()}}))
        z.writestr("policy.pth", payload)
        z.writestr("pytorch_variables.pth", payload)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("policy.json", json.dumps({"format": 1, "obs_rms": {"mean": [0], "var": [1],
                                                                        "count": 1}}))
        z.writestr("sb3_model.zip", inner.getvalue())
    return payload


def test_malicious_pickle_policy_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _malicious_zip(tmp_path / "evil.zip", marker)
    pickle.loads(payload)  # the payload is live: unpickling it does create the marker
    assert marker.exists()
    marker.unlink()
    for name in ("evil.zip", "evil.safetensors"):  # the suffix does not matter, the bytes do
        path = tmp_path / name
        if not path.exists():
            path.write_bytes((tmp_path / "evil.zip").read_bytes())
        with pytest.raises(PolicyError, match=r"format-1 zip policy.*--trust-pickle") as e:
            load_policy(path)
        assert "\n" not in str(e.value)
        with pytest.raises(PolicyError, match="--trust-pickle"):
            convert_policy(path, tmp_path / "out.safetensors")
        assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # a raw pickle passed as a policy is not a safetensors file: refused as unreadable
    (tmp_path / "raw.pkl").write_bytes(payload)
    with pytest.raises(PolicyError, match="unreadable"):
        load_policy(tmp_path / "raw.pkl")
    assert not marker.exists()


def _format1_zip(policy, path):
    """A format-1 policy file as autobits wrote it before: the SB3 zip of a SAC holding the
    policy's networks, beside policy.json."""
    from autobits.agents.sac_agent import make_sac

    table, feats, limit = problem(2, seed=1, model="a")
    env = policy.make_env(AllocTask(table, feats), limit_bytes=limit)
    arch = policy.config["architecture"]
    model, _ = make_sac(env, seed=0, net_arch=arch["net_arch"], use_sde=arch["use_sde"])
    policy._load_into(model.policy)
    buf = io.BytesIO()
    model.save(buf)
    meta = {k: policy.config[k] for k in ("feature_spec", "obs_names", "formats", "env",
                                           "clip_obs", "epsilon")}
    meta.update(format=1, obs_rms={"mean": policy.obs_mean.tolist(), "var": policy.obs_var.tolist(),
                                   "count": policy.obs_count}, meta=policy.meta)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("policy.json", json.dumps(meta))
        z.writestr("sb3_model.zip", buf.getvalue())


def test_trusted_format1_policy_converts(trained, tmp_path):
    policy, _ = trained
    old = tmp_path / "old.zip"
    _format1_zip(policy, old)
    with pytest.raises(PolicyError, match="--trust-pickle"):
        load_policy(old)
    new = convert_policy(old, tmp_path / "new.safetensors", trust_pickle=True)
    table = synthetic_table(llama_specs(4), seed=9, model="unseen")
    feats = synthetic_features(table)
    limit = int(5.5 * table.params // 8)
    want = policy.allocate(table, feats, limit_bytes=limit).tensors
    assert load_policy(new).allocate(table, feats, limit_bytes=limit).tensors == want
    assert load_policy(old, trust_pickle=True).allocate(table, feats, limit_bytes=limit).tensors == want


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
    out = tmp_path / "p.safetensors"
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
    assert main(["allocate", "--policy", str(tmp_path / "nope.safetensors"), "--model", "m",
                 "--target-bpw", "5", "--out", str(tmp_path / "run")]) == 2
    assert main(["train-policy", "--models", "m", "--bpw-range", "6:4", "--out",
                 str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.slow
def test_train_policy_and_allocate_end_to_end_on_tiny_model(tiny_folder, tmp_path, capsys):
    """The real pipeline (text, calibration, candidates, features, held-out evaluation)."""
    import json

    from autobits.app.cli import main

    small = ["--ctx", "64", "--calib-windows", "2", "--reward-windows", "1", "--reward-ctx", "32"]
    policy = tmp_path / "tiny.safetensors"
    assert main(["train-policy", "--models", str(tiny_folder), "--bpw-range", "5:7", "--out",
                 str(policy), "--steps", "100", "--gradient-steps", "2", *small]) == 0
    assert main(["allocate", "--policy", str(policy), "--model", str(tiny_folder),
                 "--target-bpw", "5.5", "--out", str(tmp_path / "run"), "--windows", "1",
                 *small]) == 0
    alloc = json.loads((tmp_path / "run" / "allocation.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert alloc["bpw"] <= 5.5 and metrics["bytes"] == alloc["bytes"] and metrics["kld"] >= 0


def test_sac_search_continues_a_saved_policy(trained):
    """SACAgent(policy=FILE): the networks come from the file (no pretraining), built from
    its manifest with its hyper-parameters, and the search still returns a feasible result."""
    from autobits.agents import SACConfig, SearchProblem, make_agent

    from test_env import fake_evaluate

    _, path = trained
    table, feats, limit = problem(3, seed=5, model="c")
    prob = SearchProblem(table=table, features=feats, limit_bytes=limit, evaluate=fake_evaluate(table))
    res = make_agent("sac", SACConfig(policy=path, batch_size=32, gradient_steps=2,
                                      finetune_gradient_steps=2)).search(prob, evals=3, seed=0)
    assert res.meta["pretrain_episodes"] == 0 and res.meta["options"]["policy"] == str(path)
    assert res.meta["options"]["action"] == "absolute"  # the policy's env options win
    assert res.best.bytes <= limit and len(res.history) >= 2
