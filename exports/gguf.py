"""Write an allocation as a GGUF file that llama.cpp loads unchanged.

:func:`export_gguf` stores every tensor of the model in its allocated ggml type, quantized
by autobits' byte-exact formats (:mod:`autobits.formats`), and norms and biases in F32, as
llama.cpp does.  The weights come from the loaded model (``LoadedModel.reference_weight``),
mapped back from transformers' layout to the GGUF layout:

* llama ``attn_q`` / ``attn_k`` (weights and biases): transformers' GGUF loader undoes the
  rotary row permutation of llama.cpp's converter (``reverse_permute_weights``), so the rows
  of the quantized bytes are permuted back (each row is quantized on its own, so permuting
  bytes rows equals quantizing the permuted weight);
* gemma3 norms: transformers subtracts 1 from every ``*norm.weight`` (Gemma's ``1 + w``
  RMSNorm), llama.cpp's converter adds it; we add it back.  A float tensor that is unchanged
  from a GGUF source is written with the source's own bytes.

Metadata: from a GGUF source every key/value field is copied (tokenizer included) except
those describing the file type, which are set here: ``general.file_type`` (the matching
llama.cpp preset's ``LLAMA_FTYPE`` when the allocation is exactly that preset, else the
dominant type's ftype marked ``GUESSED`` as llama.cpp's loader does) and
``general.quantization_version = 2``.  From a Hugging Face folder the metadata is built from
the config and tokenizer like llama.cpp's ``convert_hf_to_gguf.py`` for llama / qwen2 with a
BPE tokenizer (a pre-tokenizer recognised by its check hash); anything else is a clear
:class:`ExportError`.  ``autobits.version`` and ``autobits.allocation`` (the allocation as a
JSON string) are always added.

The file is written to a hidden temporary name in the target folder, synced, then renamed:
an interrupted or failed export leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from autobits import __version__
from autobits.allocation import FLOAT_KEPT, Allocation
from autobits.errors import AllocationError, AutobitsError
from autobits.formats import get_format
from autobits.gguf_scan import GGUFSource, scan_gguf_header
from autobits.io import OutputError, atomic_path, check_output_folder

__all__ = [
    "ExportError",
    "AUTOBITS_VERSION_KEY",
    "AUTOBITS_ALLOCATION_KEY",
    "export_gguf",
    "file_type_for",
    "gguf_row_order",
    "hf_to_gguf_values",
    "read_allocation",
]

log = logging.getLogger(__name__)

AUTOBITS_VERSION_KEY = "autobits.version"
AUTOBITS_ALLOCATION_KEY = "autobits.allocation"
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION

#: Keys set by the writer itself, never copied from the source.
_OWN_KEYS = frozenset({
    "general.architecture", "general.file_type", "general.quantization_version",
    AUTOBITS_VERSION_KEY, AUTOBITS_ALLOCATION_KEY,
})

#: llama.cpp's guess of a file type from its dominant tensor type (llama-model-loader.cpp).
_FTYPE_OF_TYPE = {
    "F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
    "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "IQ4_NL": "MOSTLY_IQ4_NL",
}

#: ``convert_hf_to_gguf.py``'s BPE pre-tokenizer check: sha256 of ``str(tokenizer.encode(
#: _CHKTXT))`` -> ``tokenizer.ggml.pre`` (the hashes of the families autobits loads).
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)


class ExportError(AutobitsError):
    """An allocation or model that cannot be written as a GGUF file, or a bad output path."""


# ----------------------------------------------------------------------------- layout
def _permutation(rows: int, n_head: int) -> np.ndarray:
    """Row index ``p`` of llama.cpp's converter ``permute``: ``gguf = hf[p]``."""
    if rows % (2 * n_head):
        raise ExportError(f"cannot permute {rows} rows into {n_head} heads of rotary pairs")
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2)
    return idx.swapaxes(1, 2).reshape(rows)


def gguf_row_order(arch: str, name: str, rows: int, config: Any) -> np.ndarray | None:
    """Rows of the transformers tensor ``name`` in GGUF order (``gguf = hf[order]``), or None.

    Only llama's ``attn_q`` / ``attn_k`` (weights and biases) are permuted: llama.cpp's
    converter interleaves the rotary halves per head, transformers' GGUF loader undoes it.
    """
    if arch != "llama":
        return None
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    if ".attn_q." in name:
        return _permutation(rows, n_head)
    if ".attn_k." in name:
        return _permutation(rows, n_kv)
    return None


def hf_to_gguf_values(arch: str, name: str, values: np.ndarray) -> np.ndarray:
    """Float values of a kept-in-float tensor as llama.cpp stores them (gemma norms + 1)."""
    if arch.startswith("gemma") and "norm.weight" in name:
        return (values.astype(np.float32) + np.float32(1)).astype(np.float32)
    return values


def _gguf_to_hf_values(arch: str, name: str, values: np.ndarray) -> np.ndarray:
    # transformers' Gemma2TensorProcessor, for the "unchanged from the source" check
    if arch.startswith("gemma") and "norm.weight" in name:
        return values - 1
    return values


# ----------------------------------------------------------------------------- file type
def file_type_for(lm, tensors: Mapping[str, str]) -> int:
    """``general.file_type`` for an allocation: a llama.cpp preset's ftype when the allocation
    is exactly what ``llama-quantize`` makes for it, else the ftype of the type holding most
    parameters, or-ed with ``LLAMA_FTYPE_GUESSED`` (1024) as llama.cpp's loader guesses."""
    import gguf

    from autobits.solvers.presets import llamacpp

    types = {tensors[s.name] for s in lm.quantizable}
    if len(types) == 1:
        only = types.pop()
        if only in _FTYPE_OF_TYPE:
            return int(getattr(gguf.LlamaFileType, _FTYPE_OF_TYPE[only]))
    for preset in ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q5_K_S", "Q3_K_M", "Q3_K_S", "Q3_K_L",
                   "Q2_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        try:
            rule = llamacpp(lm.specs, preset, arch=lm.architecture)
        except (ValueError, AutobitsError):
            continue
        if rule == dict(tensors):
            return int(getattr(gguf.LlamaFileType, f"MOSTLY_{preset}"))
    weight: dict[str, int] = {}
    for s in lm.quantizable:
        weight[tensors[s.name]] = weight.get(tensors[s.name], 0) + s.numel
    dominant = max(sorted(weight), key=lambda t: weight[t])
    base = getattr(gguf.LlamaFileType, _FTYPE_OF_TYPE.get(dominant, "MOSTLY_F16"))
    return int(base) | int(gguf.LlamaFileType.GUESSED)


# ----------------------------------------------------------------------------- metadata
def _config_value(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return None


def _hf_kv(lm) -> list[tuple[str, Any, Any, Any]]:
    """Metadata of a Hugging Face folder source, as llama.cpp's converter writes it.

    Supported: llama and qwen2 with a byte-level BPE (``gpt2``) tokenizer whose
    pre-tokenizer is recognised; anything else raises :class:`ExportError`.
    """
    import gguf

    arch, cfg = lm.architecture, lm.model.config
    if arch not in ("llama", "qwen2"):
        raise ExportError(
            f"exporting a Hugging Face {arch} folder is not supported (its tokenizer needs "
            f"llama.cpp's SentencePiece conversion); convert it with llama.cpp's "
            f"convert_hf_to_gguf.py and load that GGUF instead"
        )
    rope = dict(_config_value(cfg, "rope_parameters", "rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ExportError(
            f"{lm.path}: RoPE scaling {rope_type!r} is not supported for a Hugging Face folder "
            f"export; convert with llama.cpp's convert_hf_to_gguf.py"
        )
    w = gguf.GGUFWriter(None, arch)  # a key/value collector only, never written
    name = _config_value(cfg, "_name_or_path") or Path(lm.path).name
    w.add_type("model")
    w.add_name(str(Path(str(name)).name))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    n_head = int(cfg.num_attention_heads)
    w.add_head_count(n_head)
    w.add_head_count_kv(int(_config_value(cfg, "num_key_value_heads") or n_head))
    theta = _config_value(cfg, "rope_theta") or rope.get("rope_theta")
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    head_dim = _config_value(cfg, "head_dim")
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    if arch == "llama":
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_rope_dimension_count(int(head_dim or int(cfg.hidden_size) // n_head))
    _hf_vocab(w, lm)
    return [(k, v.value, v.type, v.sub_type) for k, v in w.kv_data[0].items()
            if k not in _OWN_KEYS]


def _hf_vocab(w, lm) -> None:
    """``convert_hf_to_gguf.py``'s ``_set_vocab_gpt2`` (``get_vocab_base``) for a BPE vocab."""
    import gguf

    tok = lm.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    model_kind = type(getattr(backend, "model", None)).__name__
    if model_kind != "BPE":
        raise ExportError(
            f"{lm.path}: tokenizer model {model_kind or type(tok).__name__!r} is not a byte-level "
            f"BPE; only BPE (gpt2-style) tokenizers are converted from a Hugging Face folder"
        )
    chkhsh = hashlib.sha256(str(tok.encode(_CHKTXT)).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(chkhsh)
    if pre is None:
        raise ExportError(
            f"{lm.path}: BPE pre-tokenizer not recognised (check hash {chkhsh}); known: "
            f"{', '.join(sorted(set(_PRE_BY_HASH.values())))}"
        )
    vocab = tok.get_vocab()
    n_vocab = int(getattr(lm.model.config, "vocab_size", None) or len(vocab))
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"tokenizer has id {max(vocab.values())} >= vocab_size {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            looks = token.startswith("<|") and token.endswith("|>")
            if decoder[i].special or looks:
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(Path(lm.path), load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    if lm.architecture == "llama" and n_vocab == 49152:
        w.add_add_bos_token(False)  # the converter's rule for this (SmolLM / granite) vocab


# ----------------------------------------------------------------------------- plan
@dataclass
class _Item:
    name: str
    ggml_type: Any  # gguf.GGMLQuantizationType
    byte_shape: tuple[int, ...]  # numpy order, last axis in bytes
    make: Callable[[], np.ndarray]  # -> uint8 array of byte_shape


def _check_allocation(lm, allocation: Allocation) -> Allocation:
    """Re-validate ``allocation`` against ``lm`` and require ggml-storable formats."""
    if not isinstance(allocation, Allocation):
        raise ExportError(f"expected an Allocation, got {type(allocation).__name__}")
    try:
        alloc = Allocation.build(lm.name, lm.specs, allocation.tensors, meta=allocation.meta)
    except AllocationError as e:
        raise ExportError(f"allocation does not fit model {lm.name!r}: {e}") from None
    packed = sorted({f for f in alloc.tensors.values() if get_format(f).ggml_type is None})
    if packed:
        raise ExportError(
            f"format(s) {', '.join(packed)} have no ggml type and cannot be stored in GGUF "
            f"(use a packed checkpoint for INT*_G* formats)"
        )
    return alloc


def _plan(lm, alloc: Allocation, importance: Mapping[str, np.ndarray] | None,
          source: GGUFSource | None, cache=None) -> list[_Item]:
    import gguf

    src = {t.name: t for t in source.tensors} if source is not None else {}
    by_name = {s.name: s for s in lm.specs}
    order = list(src) if src else [s.name for s in lm.specs]
    missing = [s.name for s in lm.specs if s.name not in order]
    if missing:
        raise ExportError(f"source file lacks tensors {missing[:5]} of the loaded model")
    cfg = lm.model.config
    items = []
    for name in order:
        spec = by_name.get(name)
        if spec is None:
            raise ExportError(f"source tensor {name!r} has no spec in the loaded model")
        if spec.hf_name is None:  # in the file, unused by torch (e.g. rope_freqs): copied
            t = src[name]
            raw = np.ascontiguousarray(t.data).view(np.uint8)
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            row_bytes = raw.size // max(1, int(np.prod(shape[:-1], dtype=np.int64)))
            byte_shape = (*shape[:-1], row_bytes)
            items.append(_Item(name, gguf.GGMLQuantizationType(int(t.tensor_type)), byte_shape,
                               lambda raw=raw, bs=byte_shape: raw.reshape(bs)))
            continue
        fmt = get_format(alloc.tensors[name] if spec.quantizable else FLOAT_KEPT)
        shape = tuple(int(x) for x in spec.shape)
        byte_shape = (*shape[:-1], shape[-1] // fmt.block_size * fmt.type_size)
        imp = None if importance is None else importance.get(name)
        held = cache if spec.quantizable and _holds(cache, name, fmt.name, imp) else None
        items.append(_Item(name, gguf.GGMLQuantizationType(fmt.ggml_type), byte_shape,
                           _maker(lm, spec, fmt, imp, src.get(name), cfg, held)))
    return items


def _maker(lm, spec, fmt, imp, src_tensor, cfg, held) -> Callable[[], np.ndarray]:
    arch, name = lm.architecture, spec.name
    rows = int(spec.shape[0])

    def make() -> np.ndarray:
        if held is not None:  # the same quantizer on the same weight and importance: reused
            data = held.quantize(name, fmt.name)
        else:
            w = lm.reference_weight(name).detach().cpu().numpy().astype(np.float32, copy=False)
            if not spec.quantizable:
                w = _kept_values(arch, name, w, src_tensor)
            data = fmt.quantize(w, imp, tensor=name)
        order = gguf_row_order(arch, name, rows, cfg)
        if order is not None:
            data = data[order] if data.ndim == 2 else data.reshape(rows, -1)[order].reshape(-1)
        return np.ascontiguousarray(data)

    return make


def _holds(cache, name: str, fmt: str, imp) -> bool:
    """True when ``cache`` (a :class:`~autobits.evaluate.WeightCache` of the same model)
    holds the bytes of (``name``, ``fmt``) quantized with the importance ``imp``."""
    if cache is None or not cache.has(name, fmt):
        return False
    theirs = cache.importance.get(name)
    if imp is None or theirs is None:
        return imp is None and theirs is None
    return np.array_equal(np.asarray(theirs), np.asarray(imp))


def _kept_values(arch: str, name: str, w: np.ndarray, src_tensor) -> np.ndarray:
    """A float tensor as llama.cpp stores it; the source's own values when unchanged."""
    import gguf

    if src_tensor is not None and int(src_tensor.tensor_type) == int(gguf.GGMLQuantizationType.F32):
        src = np.asarray(src_tensor.data, dtype=np.float32).reshape(w.shape)
        if np.array_equal(_gguf_to_hf_values(arch, name, src), w):
            return src
    return hf_to_gguf_values(arch, name, w)


# ----------------------------------------------------------------------------- export
def _check_out_path(out: Path) -> None:
    try:
        check_output_folder(out.parent)
    except OutputError as e:
        raise ExportError(str(e)) from None
    if out.is_dir():
        raise ExportError(f"output path {str(out)!r} is a folder; give a file name (.gguf)")


def export_gguf(
    lm,
    allocation: Allocation,
    out_path: str | os.PathLike,
    *,
    importance: Mapping[str, np.ndarray] | None = None,
    cache=None,
) -> Path:
    """Write ``lm`` quantized by ``allocation`` as a GGUF file at ``out_path``; return the path.

    ``importance`` maps tensor names to per-input-channel importance vectors (the imatrix
    used for rounding, as in :class:`~autobits.evaluate.WeightCache`).  ``cache``: a
    :class:`~autobits.evaluate.WeightCache` of ``lm`` (a prepared search's); the quantized
    bytes it holds with the same importance are written as they are instead of quantizing
    the tensor again (the same quantizer on the same weight: the same bytes).  Raises
    :class:`ExportError` for an allocation that does not fit the model, a format with no
    ggml type, an unsupported source, or an output path whose folder is missing; no file is
    left behind on any error.
    """
    import gguf

    out = Path(out_path)
    _check_out_path(out)
    alloc = _check_allocation(lm, allocation)
    t0 = time.perf_counter()
    source = GGUFSource(lm.gguf.path) if lm.gguf is not None else None
    kv = None if source is not None else _hf_kv(lm)
    items = _plan(lm, alloc, importance, source, cache)
    with atomic_path(out, suffix=".partial") as tmp:
        writer = gguf.GGUFWriter(tmp, lm.architecture)
        try:
            if source is not None:
                source.copy_kv(writer, skip=_OWN_KEYS)
            else:
                for key, value, vtype, sub in kv:
                    writer.add_key_value(key, value, vtype, sub_type=sub)
            writer.add_file_type(file_type_for(lm, alloc.tensors))
            writer.add_quantization_version(QUANTIZATION_VERSION)
            writer.add_string(AUTOBITS_VERSION_KEY, __version__)
            writer.add_string(AUTOBITS_ALLOCATION_KEY, json.dumps(alloc.to_json(), sort_keys=True))
            for it in items:
                nbytes = int(np.prod(it.byte_shape, dtype=np.int64))
                writer.add_tensor_info(it.name, it.byte_shape, np.dtype(np.uint8), nbytes,
                                       raw_dtype=it.ggml_type)
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for it in items:
                data = it.make()
                if data.dtype != np.uint8 or tuple(data.shape) != it.byte_shape:
                    raise ExportError(
                        f"tensor {it.name!r}: produced {data.dtype} {tuple(data.shape)}, "
                        f"expected uint8 {it.byte_shape}"
                    )
                writer.write_tensor_data(data)
        finally:
            writer.close()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    log.info("wrote %s: %d tensors, %d bytes (%.4f bpw tensors) in %.1fs", out, len(items),
             out.stat().st_size, alloc.bpw, time.perf_counter() - t0)
    return out


def read_allocation(path: str | os.PathLike) -> dict | None:
    """The ``autobits.allocation`` JSON recorded in a GGUF file (None when absent)."""
    raw = scan_gguf_header(Path(path)).metadata.get(AUTOBITS_ALLOCATION_KEY)
    return None if raw is None else json.loads(raw)
