"""GGUF export: golden round trips, layout, metadata, atomic writes, bad input, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gguf

from autobits.allocation import Allocation  # noqa: E402
from autobits.app.cli import main  # noqa: E402
from autobits.evaluate import WeightCache  # noqa: E402
from autobits.formats import dequantize, quantize  # noqa: E402
from autobits.exports import gguf as gx  # noqa: E402
from autobits.exports.gguf import ExportError, export_gguf, gguf_row_order, read_allocation  # noqa: E402


def _mixed(lm) -> Allocation:
    """At least four types, a K-quant wherever a row fits 256 (ffn_down), F16 somewhere."""
    cycle = ["Q8_0", "Q4_0", "Q5_1", "IQ4_NL", "Q4_1", "Q5_0"]
    tensors = {}
    for i, s in enumerate(lm.quantizable):
        if s.row_length % 256 == 0:
            tensors[s.name] = ["Q4_K", "Q2_K", "Q6_K", "Q3_K", "Q5_K"][i % 5]
        elif s.role == "token_embd":
            tensors[s.name] = "Q8_0"
        elif s.role == "attn_v":
            tensors[s.name] = "F16"
        else:
            tensors[s.name] = cycle[i % len(cycle)]
    return Allocation.build(lm.name, lm.specs, tensors)


def _tensor_bytes(t) -> np.ndarray:
    return np.asarray(t.data).view(np.uint8).reshape(-1)


def _gguf_to_hf(lm, name, values):
    order = gguf_row_order(lm.architecture, name, values.shape[0], lm.model.config)
    if order is None:
        return values
    out = np.empty_like(values)
    out[order] = values
    return out


@pytest.fixture(scope="module")
def tiny_export(tiny_lm, tmp_path_factory):
    alloc = _mixed(tiny_lm)
    path = export_gguf(tiny_lm, alloc, tmp_path_factory.mktemp("exp") / "tiny-mixed.gguf")
    return alloc, path


# --------------------------------------------------------------------------- layout
def test_row_order_inverts_transformers_reverse_permute():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    class Cfg:
        num_attention_heads, num_key_value_heads = 4, 2

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for name, rows in (("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)):
        gguf_w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        hf_w = proc.process(gguf_w, name).weights
        order = gguf_row_order("llama", name, rows, Cfg)
        assert np.array_equal(hf_w[order], gguf_w), name
    assert gguf_row_order("llama", "blk.0.attn_v.weight", 32, Cfg) is None
    assert gguf_row_order("qwen2", "blk.0.attn_q.weight", 64, Cfg) is None


def test_gemma_norms_get_their_one_back():
    v = np.array([-0.5, 0.0, 2.0], dtype=np.float32)
    assert np.array_equal(gx.hf_to_gguf_values("gemma3", "blk.0.attn_q_norm.weight", v), v + 1)
    assert np.array_equal(gx.hf_to_gguf_values("gemma3", "blk.0.attn_q.bias", v), v)
    assert np.array_equal(gx.hf_to_gguf_values("llama", "output_norm.weight", v), v)


# --------------------------------------------------------------------------- round trip
def test_tiny_round_trip_types_and_values(tiny_lm, tiny_export):
    """Read back: every tensor has its allocated type and dequantizes to what the evaluator
    used (the WeightCache's dequantized weight, rows back in transformers' order)."""
    alloc, path = tiny_export
    assert len(set(alloc.tensors.values())) >= 4
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    assert set(got) == {s.name for s in tiny_lm.specs}
    cache = WeightCache(tiny_lm)
    for s in tiny_lm.specs:
        t = got[s.name]
        fmt = alloc.tensors.get(s.name, "F32")
        assert t.tensor_type.name == fmt, s.name
        assert tuple(reversed(t.shape.tolist())) == s.shape
        values = dequantize(_tensor_bytes(t), fmt, s.shape)
        expect = (cache.get(s.name, fmt) if s.quantizable else tiny_lm.reference_weight(s.name)).numpy()
        assert np.array_equal(_gguf_to_hf(tiny_lm, s.name, values), expect), s.name
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    assert tensor_bytes == alloc.bytes


def test_tiny_metadata_recorded(tiny_lm, tiny_export):
    alloc, path = tiny_export
    reader = gguf.GGUFReader(path)
    f = reader.fields
    assert f["autobits.version"].contents() == gx.__version__
    assert read_allocation(path) == json.loads(json.dumps(alloc.to_json()))
    assert f["general.quantization_version"].contents() == 2
    assert f["general.file_type"].contents() & int(gguf.LlamaFileType.GUESSED)
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.block_count"].contents() == 2
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["tokenizer.ggml.pre"].contents() == "smollm"


def test_hf_tokenizer_matches_llama_cpp_conversion(tiny_lm, tiny_export, smol_path):
    """The tiny folder carries SmolLM2's tokenizer: our BPE port must give the vocabulary,
    token types and merges llama.cpp's converter wrote into SmolLM2's own GGUF."""
    _, path = tiny_export
    ours = gguf.GGUFReader(path).fields
    src = gguf.GGUFReader(smol_path).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours[key].contents() == src[key].contents(), key


def test_file_type_of_uniform_and_preset(tiny_lm):
    from autobits.solvers.presets import llamacpp

    assert gx.file_type_for(tiny_lm, Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0").tensors) == 7
    rule = llamacpp(tiny_lm.specs, "Q4_K_M")
    assert gx.file_type_for(tiny_lm, rule) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_importance_changes_bytes_like_the_quantizer(tiny_lm, tmp_path):
    name = "blk.0.ffn_down.weight"
    alloc = Allocation.build(tiny_lm.name, tiny_lm.specs, {
        s.name: ("Q4_K" if s.name == name else "Q8_0") for s in tiny_lm.quantizable})
    imp = {name: np.linspace(0.1, 4.0, 256, dtype=np.float32)}
    path = export_gguf(tiny_lm, alloc, tmp_path / "imp.gguf", importance=imp)
    t = {t.name: t for t in gguf.GGUFReader(path).tensors}[name]
    w = tiny_lm.reference_weight(name).numpy()
    assert np.array_equal(_tensor_bytes(t), quantize(w, "Q4_K", imp[name]).reshape(-1))
    assert not np.array_equal(_tensor_bytes(t), quantize(w, "Q4_K").reshape(-1))


def test_cached_bytes_reused_only_with_the_same_importance(tiny_lm, tmp_path):
    """export_gguf(cache=...) writes a search's quantized bytes instead of quantizing again
    (the same file as without the cache); bytes held with other importance are not used."""
    alloc = _mixed(tiny_lm)
    rng = np.random.default_rng(0)
    imp = {s.name: rng.uniform(0.1, 3.0, s.row_length).astype(np.float32)
           for s in tiny_lm.quantizable}
    plain = export_gguf(tiny_lm, alloc, tmp_path / "plain.gguf", importance=imp)
    cache = WeightCache(tiny_lm, imp)
    for name, fmt in alloc.tensors.items():
        if WeightCache.keeps(fmt):
            cache.quantize(name, fmt)
    cached = export_gguf(tiny_lm, alloc, tmp_path / "cached.gguf", importance=imp, cache=cache)
    assert cached.read_bytes() == plain.read_bytes()

    # the held bytes are what is written: a marked copy shows up in the file
    name = "blk.1.ffn_down.weight"
    fmt = alloc.tensors[name]
    marked = cache.quantize(name, fmt).copy()
    marked.reshape(-1)[:4] ^= 0xFF
    poisoned = WeightCache(tiny_lm, imp)
    poisoned.put(name, fmt, marked)
    out = export_gguf(tiny_lm, alloc, tmp_path / "marked.gguf", importance=imp, cache=poisoned)
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}[name]
    assert np.array_equal(_tensor_bytes(got), marked.reshape(-1))
    # held with other importance (none): not used
    other = WeightCache(tiny_lm, None)
    other.put(name, fmt, marked)
    again = export_gguf(tiny_lm, alloc, tmp_path / "again.gguf", importance=imp, cache=other)
    assert again.read_bytes() == plain.read_bytes()


# --------------------------------------------------------------------------- atomic / errors
def test_interrupted_export_leaves_nothing(tiny_lm, tmp_path, monkeypatch):
    alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
    real = gx._maker

    def failing(lm, spec, *a):
        make = real(lm, spec, *a)
        if spec.name != "blk.1.ffn_up.weight":
            return make

        def boom():
            raise KeyboardInterrupt("injected")

        return boom

    monkeypatch.setattr(gx, "_maker", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_lm, alloc, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
    # an existing file of that name survives a failed export untouched
    target = tmp_path / "x.gguf"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_lm, alloc, target)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"


def test_bad_inputs_are_clear_and_leave_no_file(tiny_lm, tmp_path):
    ok = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q8_0")
    with pytest.raises(ExportError, match="output folder .* does not exist"):
        export_gguf(tiny_lm, ok, tmp_path / "missing" / "x.gguf")
    with pytest.raises(ExportError, match="is a folder"):
        export_gguf(tiny_lm, ok, tmp_path)
    other = Allocation(model="other", tensors={**ok.tensors, "blk.9.attn_q.weight": "Q8_0"},
                       bytes=ok.bytes, params=ok.params)
    with pytest.raises(ExportError, match="does not fit model .*blk.9.attn_q.weight"):
        export_gguf(tiny_lm, other, tmp_path / "x.gguf")
    misfit = Allocation(model=ok.model, tensors={**ok.tensors, "blk.0.attn_q.weight": "Q4_K"},
                        bytes=ok.bytes, params=ok.params)
    with pytest.raises(ExportError, match="row length 64 is not a multiple of Q4_K block size 256"):
        export_gguf(tiny_lm, misfit, tmp_path / "x.gguf")
    packed = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "INT4_G32")
    with pytest.raises(ExportError, match="INT4_G32 have no ggml type"):
        export_gguf(tiny_lm, packed, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI
def test_cli_export(capsys, tiny_lm, tiny_folder, tmp_path):
    alloc = _mixed(tiny_lm).save(tmp_path / "a.json")
    out = tmp_path / "m.gguf"
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(alloc), "--gguf", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0 and out.is_file()
    assert str(out) in stdout and f"{out.stat().st_size:,}" in stdout and "bpw" in stdout


def test_cli_export_errors(capsys, tiny_lm, tiny_folder, tmp_path):
    alloc = _mixed(tiny_lm).save(tmp_path / "a.json")
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(alloc),
                 "--gguf", str(tmp_path / "nope" / "m.gguf")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "tensors": {"blk.7.ffn_up.weight": "Q8_0"}}))
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(bad),
                 "--gguf", str(tmp_path / "m.gguf")])
    assert code == 2 and "blk.7.ffn_up.weight" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_imatrix_rounds_with_calibration(capsys, tiny_lm, tiny_folder, tmp_path):
    from autobits.calibrate import calibrate
    from autobits.text import load_text, make_windows

    alloc = _mixed(tiny_lm)
    path = alloc.save(tmp_path / "a.json")
    out = tmp_path / "m.gguf"
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(path), "--gguf",
                 str(out), "--imatrix", "--ctx", "64", "--calib-windows", "2"])
    assert code == 0 and "imatrix" in capsys.readouterr().out
    windows = make_windows(load_text("stdlib"), tiny_lm.tokenizer, ctx=64).split(calib=2, eval=0)
    calib = calibrate(tiny_lm, windows.calib, fisher_windows=0, progress=False)
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in ("blk.0.ffn_down.weight", "blk.1.attn_output.weight"):
        w = tiny_lm.reference_weight(name).numpy()
        fmt = alloc.tensors[name]
        expect = quantize(w, fmt, calib.importance(name)).reshape(-1)
        assert np.array_equal(_tensor_bytes(got[name]), expect), name


def test_cli_export_fold(capsys, tiny_lm, tiny_folder, tmp_path):
    alloc = Allocation.uniform(tiny_lm.name, tiny_lm.specs, "Q4_0").save(tmp_path / "a.json")
    out = tmp_path / "f.gguf"
    code = main(["export", "--model", str(tiny_folder), "--allocation", str(alloc), "--gguf",
                 str(out), "--fold", "--ctx", "64", "--calib-windows", "2"])
    assert code == 0 and "folded" in capsys.readouterr().out
    got = {t.name: t for t in gguf.GGUFReader(out).tensors}
    norm = np.asarray(got["blk.0.attn_norm.weight"].data)
    assert not np.array_equal(norm, tiny_lm.reference_weight("blk.0.attn_norm.weight").numpy())


# --------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_golden_round_trip(smollm2, tmp_path):
    """SmolLM2's source is Q4_1 (+ Q8_0 embeddings): re-quantizing its dequantized weights to
    their source types, with attn_q/attn_k rows permuted back, must reproduce the file's
    tensors byte for byte, and its metadata field for field."""
    lm = smollm2
    alloc = Allocation.build(lm.name, lm.specs, {s.name: lm.gguf.tensors[s.name][1] for s in lm.quantizable})
    path = export_gguf(lm, alloc, tmp_path / "smol.gguf")
    src = gguf.GGUFReader(lm.gguf.path)
    ours = gguf.GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in src.tensors]
    for a, b in zip(ours.tensors, src.tensors):
        assert a.tensor_type == b.tensor_type, a.name
        assert np.array_equal(_tensor_bytes(a), _tensor_bytes(b)), a.name
    for key, field in src.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key].contents() == field.contents(), key
    assert read_allocation(path)["tensors"] == alloc.tensors
