"""Model loading: tiny Hugging Face folder (unit) and the real SmolLM2 GGUF (integration)."""

import struct

import numpy as np
import pytest

from autobits.errors import ModelLoadError
from autobits.model import load_model, read_gguf_header


def test_tiny_folder_specs(tiny_lm):
    names = [s.name for s in tiny_lm.specs]
    assert names[0] == "token_embd.weight" and names[-1] == "output_norm.weight"
    assert "output.weight" not in names  # tied head is stored once
    q = [s for s in tiny_lm.specs if s.quantizable]
    assert len(q) == 1 + 2 * 7
    down = tiny_lm.spec("blk.1.ffn_down.weight")
    assert down.shape == (64, 256) and down.role == "ffn_down" and down.block == 1
    assert "Q4_K" in down.valid_formats() and "Q4_K" not in tiny_lm.spec("blk.1.attn_q.weight").valid_formats()
    assert tiny_lm.n_params == sum(p.numel() for p in tiny_lm.model.parameters())


def test_weight_swap_and_restore(tiny_lm):
    import torch

    ref = tiny_lm.reference_weight("blk.0.attn_q.weight")
    tiny_lm.set_weight("blk.0.attn_q.weight", torch.zeros_like(ref))
    assert tiny_lm.parameter("blk.0.attn_q.weight").abs().sum() == 0
    tiny_lm.restore()
    assert tiny_lm.parameter("blk.0.attn_q.weight").data_ptr() == ref.data_ptr()


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a built-in name"):
        load_model(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(bad)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(folder)


def test_truncated_gguf(tmp_path, smol_path):
    data = smol_path.read_bytes()
    for cut in (len(data) // 2, 4096, 12):
        t = tmp_path / f"trunc{cut}.gguf"
        t.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated|corrupt"):
            read_gguf_header(t)


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'"):
        load_model(path)


def test_smollm2_specs_match_file(smollm2, smol_path):
    import gguf

    lm = smollm2
    assert lm.architecture == "llama"
    assert len(lm.specs) == len(lm.gguf.tensors) == 272
    assert len(lm.quantizable) == 1 + 30 * 7
    assert lm.n_params == 134_515_008
    emb = lm.spec("token_embd.weight")
    assert emb.shape == (49152, 576) and emb.source_type == "Q8_0"
    # the reference weights are the file's own tensors, dequantized
    reader = gguf.GGUFReader(smol_path)
    t = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(576, 1536)
    got = lm.reference_weight("blk.7.ffn_down.weight").numpy()
    np.testing.assert_array_equal(got, want)


def test_gguf_weights_equal_transformers_gguf_loader(smol_path, tmp_path, monkeypatch):
    """The GGUF loader reads the weights itself (transformers only gives the config and
    tokenizer): the state dict and the logits are bit-identical to transformers' own GGUF
    loader on SmolLM2 (Q4_1 with a Q8_0 embedding, tied head, 9 query and 3 KV heads, so
    llama's q/k row permutation is undone both ways); a float copy of the file that differs
    only in ``general.file_type`` finds the same cached config folder."""
    import gguf
    import torch
    import transformers

    monkeypatch.setenv("AUTOBITS_CACHE", str(tmp_path / "cache"))
    lm = load_model(smol_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, dtype=torch.float32, local_files_only=True)
    ours, theirs = lm.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    ids = torch.arange(3, 67).reshape(1, -1)
    assert torch.equal(lm.model(ids).logits, ref(ids).logits)
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()
    # the config, read from the metadata without the vocabulary arrays, is transformers' own
    # (less the quantization record of its GGUF loader, which autobits drops)
    ours_cfg, theirs_cfg = lm.model.config.to_dict(), ref.config.to_dict()
    for d in (ours_cfg, theirs_cfg):
        d.pop("_name_or_path", None)
        d.pop("quantization_config", None)
    assert ours_cfg == theirs_cfg
    folders = list((tmp_path / "cache" / "gguf-config").iterdir())
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()
    # a float copy's header (other file type, an autobits key): the same config key
    from autobits.gguf_scan import GGUFSource
    from autobits.model import _config_key

    src = GGUFSource(smol_path)
    copy = tmp_path / "copy.gguf"
    w = gguf.GGUFWriter(str(copy), "llama")
    src.copy_kv(w, skip={"general.architecture", "general.file_type"})
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_string("autobits.note", "a stand-in's own key")
    for t in src.tensors:
        w.add_tensor(t.name, np.zeros(1, np.float32))  # the key reads names, not data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert _config_key(GGUFSource(copy)) == _config_key(src)


def test_config_without_vocabulary_arrays_keeps_head_and_vocabulary(smol_path, tmp_path):
    """transformers' config is read from the metadata without the vocabulary arrays: the
    vocabulary size comes from their length, an ``output.weight`` unties the head."""
    import gguf

    from autobits.gguf_scan import GGUFSource
    from autobits.model import _transformers_config

    src = GGUFSource(smol_path)
    untied = tmp_path / "untied.gguf"
    w = gguf.GGUFWriter(str(untied), "llama")
    src.copy_kv(w, skip={"general.architecture"})
    for name in ("token_embd.weight", "output.weight"):
        w.add_tensor(name, np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tied, not_tied = _transformers_config(smol_path, src), _transformers_config(
        untied, GGUFSource(untied))
    assert tied.tie_word_embeddings and not not_tied.tie_word_embeddings
    assert tied.vocab_size == not_tied.vocab_size == 49152
