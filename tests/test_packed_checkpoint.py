"""Packed checkpoints: export, load with validation, swap into the model, evaluate.

The torch backend must reproduce the in-memory evaluation of the same allocation exactly;
the Triton backend (interpreter mode on CPU) must agree with it within float tolerance.
"""

from __future__ import annotations

import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton (and the kernels) are imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from autobits.allocation import Allocation  # noqa: E402
from autobits.evaluate import Evaluator, WeightCache  # noqa: E402
from autobits.exports.packed import (  # noqa: E402
    MANIFEST, WEIGHTS, PackedCheckpointError, export_packed, load_packed,
)
from autobits.formats import get_format  # noqa: E402
from autobits.app.packed_eval import evaluate_packed  # noqa: E402
from autobits.packed_layout import join_blocks  # noqa: E402
from autobits.kernels.quant_linear import QuantLinear, swap_linears  # noqa: E402
from autobits.model import load_model  # noqa: E402

#: per role, for the tiny llama (rows of 64, ffn_down rows of 256)
MIX = {
    "token_embd": "INT8_G64", "attn_q": "INT4_G32", "attn_k": "INT3_G32", "attn_v": "INT6_G64",
    "attn_output": "F16", "ffn_gate": "INT5_G32", "ffn_up": "INT2_G64", "ffn_down": "INT4_G128",
}
TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Packed weights are decoded "
        "group by group, with a scale and a zero per group of values. ") * 40


def _mix(lm, mix=MIX) -> Allocation:
    tensors = {s.name: mix[s.role] for s in lm.specs if s.quantizable}
    return Allocation.build(lm.name, lm.specs, tensors)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "tiny-mix"
    importance = {"blk.0.attn_q.weight": np.linspace(0.1, 2.0, 64, dtype=np.float32)}
    export_packed(tiny_lm, _mix(tiny_lm), out, importance=importance)
    return out, importance


def test_export_roundtrip(tiny_lm, tiny_ckpt):
    out, importance = tiny_ckpt
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, WEIGHTS]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    ck = load_packed(out)
    m = ck.manifest
    assert m["version"] == 1 and m["model"] == tiny_lm.name and m["architecture"] == "llama"
    alloc = _mix(tiny_lm)
    assert m["bytes"] == alloc.bytes  # every tensor stored, exactly the allocation's size
    for s in tiny_lm.specs:
        e = m["tensors"][s.name]
        assert e["hf_name"] == s.hf_name and tuple(e["shape"]) == s.shape
        ref = tiny_lm.reference_weight(s.name).numpy()
        if s.name in ck.packed:
            pw = ck.packed[s.name]
            fmt = get_format(e["format"])
            assert (e["bits"], e["group"]) == (pw.bits, pw.group) and fmt.name == alloc.tensors[s.name]
            data = fmt.quantize(ref, importance.get(s.name), tensor=s.name)
            got = join_blocks(pw.codes.numpy(), pw.scales.numpy(), pw.zeros.numpy(),
                              bits=pw.bits, group=pw.group)
            assert np.array_equal(got, data.reshape(got.shape)), s.name
        else:
            fw = ck.floats[s.name]
            want = "F16" if s.role == "attn_output" else "F32"
            assert fw.format == e["format"] == want
            assert torch.equal(fw.tensor, torch.from_numpy(ref).to(fw.tensor.dtype))
    assert set(ck.formats) == {s.name for s in tiny_lm.specs}


def test_export_refuses_ggml_types_and_bad_targets(tiny_lm, tmp_path):
    bad = dict(MIX, ffn_up="Q8_0")
    with pytest.raises(PackedCheckpointError, match=r"'blk\.0\.ffn_up\.weight' is allocated Q8_0"):
        export_packed(tiny_lm, _mix(tiny_lm, bad), tmp_path / "x")
    assert not list(tmp_path.iterdir())
    with pytest.raises(PackedCheckpointError, match="does not exist"):
        export_packed(tiny_lm, _mix(tiny_lm), tmp_path / "missing" / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PackedCheckpointError, match="not a packed checkpoint"):
        export_packed(tiny_lm, _mix(tiny_lm), tmp_path / "busy")
    other = Allocation(model="other", tensors={"blk.99.attn_q.weight": "INT4_G32"}, bytes=1, params=1)
    with pytest.raises(PackedCheckpointError, match="does not fit model"):
        export_packed(tiny_lm, other, tmp_path / "x")


def test_export_replaces_existing_checkpoint(tiny_lm, tmp_path):
    out = tmp_path / "ck"
    export_packed(tiny_lm, _mix(tiny_lm), out)
    uniform = {s.name: "INT8_G32" for s in tiny_lm.specs if s.quantizable}
    export_packed(tiny_lm, Allocation.build(tiny_lm.name, tiny_lm.specs, uniform), out)
    assert {w.format for w in load_packed(out).packed.values()} == {"INT8_G32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _copy(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_errors(tiny_ckpt, tmp_path):
    src, _ = tiny_ckpt
    with pytest.raises(PackedCheckpointError, match="does not exist"):
        load_packed(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackedCheckpointError, match="no manifest.json"):
        load_packed(tmp_path / "empty")
    d = _copy(src, tmp_path / "noweights")
    (d / WEIGHTS).unlink()
    with pytest.raises(PackedCheckpointError, match="no weights.safetensors"):
        load_packed(d)

    def tampered(name, edit):
        d = _copy(src, tmp_path / name)
        m = json.loads((d / MANIFEST).read_text())
        edit(m)
        (d / MANIFEST).write_text(json.dumps(m))
        return d

    d = tampered("shape", lambda m: m["tensors"]["blk.1.attn_q.weight"].update(shape=[64, 128]))
    with pytest.raises(PackedCheckpointError,
                       match=r"'blk\.1\.attn_q\.weight': 'blk\.1\.attn_q\.weight\.codes' is "
                             r"torch\.uint8 \(64, 32\), expected torch\.uint8 \(64, 64\)"):
        load_packed(d)
    d = tampered("version", lambda m: m.update(version=7))
    with pytest.raises(PackedCheckpointError, match="version 7, expected 1"):
        load_packed(d)
    d = tampered("drop", lambda m: m["tensors"].pop("output_norm.weight"))
    with pytest.raises(PackedCheckpointError, match="does not list.*output_norm"):
        load_packed(d)
    d = tampered("fmt", lambda m: m["tensors"]["blk.0.ffn_up.weight"].update(format="Q4_K"))
    with pytest.raises(PackedCheckpointError, match="format 'Q4_K'"):
        load_packed(d)
    d = _copy(src, tmp_path / "corrupt")
    (d / WEIGHTS).write_bytes(b"not a safetensors file")
    with pytest.raises(PackedCheckpointError, match="not a readable safetensors"):
        load_packed(d)


def _scored_logits(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=ids, use_cache=False).logits


def test_swap_torch_equals_in_memory_and_triton_close(tiny_folder, tiny_ckpt):
    """torch backend == the evaluator's dequantized weights, bit for bit; triton ≈ torch."""
    out, importance = tiny_ckpt
    lm = load_model(tiny_folder)  # a private copy: the swap modifies the model
    alloc = _mix(lm)
    ids = torch.tensor([[1, 520, 33, 7, 9001, 15, 42, 3]])
    cache = WeightCache(lm, importance)
    for name, fmt in alloc.tensors.items():
        lm.set_weight(name, cache.get(name, fmt))
    want = _scored_logits(lm, ids)
    lm.restore()
    replaced = swap_linears(lm, load_packed(out), backend="torch")
    assert len(replaced) == 2 * 6 + 1  # 6 packed linears per block (attn_output F16) + tied head
    assert isinstance(lm.model.lm_head, QuantLinear)
    got = _scored_logits(lm, ids)
    assert torch.equal(got, want)
    for mod in lm.model.modules():
        if isinstance(mod, QuantLinear):
            mod.backend = "triton"
    tri = _scored_logits(lm, ids[:, :3])
    torch.testing.assert_close(tri, want[:, :3], rtol=1e-4, atol=1e-4)


def test_evaluate_packed_same_metrics_as_in_memory(tiny_folder, tiny_lm, tiny_ckpt, tmp_path):
    out, importance = tiny_ckpt
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    from autobits.text import load_text, make_windows

    split = make_windows(load_text(text), tiny_lm.tokenizer, ctx=16).split(calib=0, eval=1)
    ev = Evaluator(tiny_lm, split.eval)
    ev.cache = WeightCache(tiny_lm, importance)  # (Evaluator(cache=...) drops an empty cache)
    mem = ev.evaluate(_mix(tiny_lm))
    m, got_split, lm = evaluate_packed(out, backend="torch", model=str(tiny_folder), text=str(text),
                                       ctx=16, windows=1)
    assert got_split.eval_ids == split.eval_ids
    # the same weights: bytes and top-1 exactly, KLD and PPL to float32 rounding (a different
    # torch thread count, set by an earlier test, reorders the matmul sums)
    assert (m.top1, m.bytes) == (mem.top1, mem.bytes)
    assert m.ppl == pytest.approx(mem.ppl, rel=1e-5) and m.kld == pytest.approx(mem.kld, abs=1e-6)
    mt, _, _ = evaluate_packed(out, backend="triton", model=str(tiny_folder), text=str(text),
                               ctx=16, windows=1)
    assert mt.ppl == pytest.approx(m.ppl, rel=1e-4) and mt.kld == pytest.approx(m.kld, abs=1e-5)
    with pytest.raises(PackedCheckpointError, match="backend must be one of"):
        evaluate_packed(out, backend="cuda")


def test_eval_packed_cli(tiny_folder, tiny_ckpt, tmp_path, capsys):
    """``autobits eval --packed DIR --backend torch`` prints the table and writes the JSON."""
    from autobits.app.cli import main

    out, _ = tiny_ckpt
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    rc = main(["eval", "--packed", str(out), "--backend", "torch", "--model", str(tiny_folder),
               "--text", str(text), "--ctx", "16", "--windows", "1",
               "--json", str(tmp_path / "m.json")])
    assert rc == 0
    assert "tiny-mix (torch)" in capsys.readouterr().out
    payload = json.loads((tmp_path / "m.json").read_text())
    assert payload["backend"] == "torch" and payload["windows"] == 1 and payload["kld"] >= 0
