"""Load a real model offline: a GGUF file or a Hugging Face folder -> torch model + specs.

The reference weights are the loaded model's own: for a GGUF source, its tensors
dequantized by gguf-py straight from the file, laid out as transformers' GGUF loader lays
them out (transformers reads only the config and tokenizer, cached per vocabulary and
config).  Every tensor of the model file is described
by a :class:`~autobits.specs.TensorSpec` under its GGUF name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autobits.errors import ModelLoadError
from autobits.formats import FORMAT_TABLE, get_format
from autobits.gguf_scan import GGUFSource, scan_gguf_header, tensor_table
from autobits.io import atomic_dir
from autobits.names import SUPPORTED_ARCHITECTURES, hf_to_gguf_name
from autobits.registry import cache_dir, resolve_model_path
from autobits.specs import QUANTIZABLE_ROLES, TensorSpec, block_of, order_specs, role_of
from autobits.tokenizer import match_llama_cpp

__all__ = ["FLOAT_SOURCE_TYPES", "LoadedModel", "load_model", "read_gguf_header", "GGUFInfo"]

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
#: Storage types of an unquantized source tensor (GGUF type names, safetensors dtypes).
FLOAT_SOURCE_TYPES = frozenset({"F32", "F16", "BF16", "F64"})


@dataclass(frozen=True)
class GGUFInfo:
    """What we read of a GGUF file without loading weights."""

    path: Path
    architecture: str
    tensors: dict[str, tuple[tuple[int, ...], str]]  # name -> (numpy-order shape, type name)
    metadata: dict[str, Any] = field(repr=False)


def read_gguf_header(path: str | os.PathLike) -> GGUFInfo:
    """Validate a GGUF file (magic, completeness, architecture) and list its tensors.

    One bounded pass over the header (:func:`~autobits.gguf_scan.scan_gguf_header`); every
    tensor's bytes must lie inside the file.  No weights are read.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    with path.open("rb") as fh:
        head = fh.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelLoadError(
            f"{str(path)!r} is not a GGUF file (expected magic b'GGUF', got {head[:4]!r})"
        )
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (2, 3):
        raise ModelLoadError(f"{str(path)!r}: unsupported GGUF version {version}, expected 2 or 3")
    header = scan_gguf_header(path)
    tensors = {t.name: (t.shape, t.type_name) for t in tensor_table(path, header).values()}
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{str(path)!r}: unsupported architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return GGUFInfo(path=path, architecture=arch, tensors=tensors, metadata=dict(header.metadata))


@dataclass
class LoadedModel:
    """A model ready for evaluation: torch module (float32, eval mode), tokenizer, specs."""

    name: str
    path: Path
    architecture: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    specs: tuple[TensorSpec, ...]
    gguf: GGUFInfo | None = None

    def __post_init__(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params = params
        # the reference weights: kept by reference, never modified in place
        self._reference = {s.name: params[s.hf_name].data for s in self.specs if s.hf_name}

    @property
    def quantizable(self) -> tuple[TensorSpec, ...]:
        return tuple(s for s in self.specs if s.quantizable)

    @property
    def n_params(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def context_length(self) -> int | None:
        """The context the model was trained for (None when its config does not say)."""
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    def check_context(self, ctx: int) -> None:
        """Refuse windows longer than the trained context (positions past it are untrained)."""
        n = self.context_length
        if n is not None and ctx > n:
            raise ModelLoadError(
                f"--ctx {ctx} exceeds the trained context of {self.name!r} ({n} tokens)"
            )

    @property
    def source_types(self) -> dict[str, str]:
        """How the source file stores each quantizable tensor (``Q4_1``, ``F16``, ``BF16``...)."""
        return {s.name: s.source_type for s in self.quantizable}

    @property
    def source_quantized(self) -> bool:
        """Whether the source stores any quantizable tensor in a quantized (non-float) type.

        Re-quantizing such a tensor to its own format reproduces it exactly, so quality
        measured on this source flatters that format (measure on a float stand-in instead).
        """
        return any(t not in FLOAT_SOURCE_TYPES for t in self.source_types.values())

    def spec(self, name: str) -> TensorSpec:
        for s in self.specs:
            if s.name == name:
                return s
        raise KeyError(name)

    def reference_weight(self, name: str):
        """The reference float weight of tensor ``name`` (a torch tensor; do not modify)."""
        return self._reference[name]

    def parameter(self, name: str):
        return self._params[self.spec(name).hf_name]

    def set_weight(self, name: str, tensor) -> None:
        """Point tensor ``name``'s parameter at ``tensor`` (no copy)."""
        self.parameter(name).data = tensor

    def restore(self) -> None:
        """Point every parameter back at its reference weight."""
        for s in self.specs:
            if s.hf_name:
                self._params[s.hf_name].data = self._reference[s.name]


def _hf_specs(arch: str, model, tied: bool) -> list[TensorSpec]:
    specs = []
    seen = set()
    for hf_name, p in model.named_parameters(remove_duplicate=False):
        gname = hf_to_gguf_name(arch, hf_name)
        if gname is None:
            raise ModelLoadError(f"parameter {hf_name!r} of a {arch} model has no GGUF name")
        if gname == "output.weight" and tied:
            continue  # tied head: stored once, as token_embd
        if gname in seen:
            continue
        seen.add(gname)
        role = role_of(gname)
        specs.append(
            TensorSpec(
                name=gname,
                shape=tuple(int(x) for x in p.shape),
                role=role,
                block=block_of(gname),
                hf_name=hf_name,
                source_type=str(p.dtype).removeprefix("torch.").upper().replace("FLOAT", "F"),
                quantizable=role in QUANTIZABLE_ROLES and p.dim() == 2,
            )
        )
    return specs


def _configure_torch() -> None:
    import torch

    from autobits.memory import configure_allocator

    configure_allocator()  # freed tensors go back to the OS (see autobits.memory)
    n = os.cpu_count() or 1
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_model(name_or_path: str | os.PathLike) -> LoadedModel:
    """Load a built-in name, a GGUF file or a Hugging Face folder, offline, in float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = resolve_model_path(name_or_path)
    _configure_torch()
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(
                f"{str(path)!r} is a folder without config.json; expected a Hugging Face "
                f"model folder or a GGUF file"
            )
        try:
            cfg = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{str(config_path)!r} is not valid JSON: {e}") from None
        arch = cfg.get("model_type")
        if arch == "gemma3_text":
            arch = "gemma3"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{str(path)!r}: unsupported architecture {cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        info = None
    else:
        info = read_gguf_header(path)
        arch = info.architecture
    log.debug("loading %s (%s) from %s", name_or_path, arch, path)
    if info is None:
        tokenizer, model = _from_pretrained(path)
    else:
        tokenizer, model = _from_gguf(path, info)
    if info is not None:
        tokenizer = match_llama_cpp(tokenizer, path, info.metadata)
    model.eval()
    model.requires_grad_(False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if info is not None and "output.weight" in info.tensors:
        tied = False
    specs = _hf_specs(arch, model, tied)
    if info is not None:
        specs = _reconcile_with_gguf(specs, info)
    else:
        specs = _with_safetensors_types(specs, path)
    for pname, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelLoadError(
                f"{str(path)!r}: weight {pname!r} contains NaN or Inf; expected finite weights"
            )
    name = str(name_or_path)
    return LoadedModel(
        name=name, path=path, architecture=arch, model=model, tokenizer=tokenizer,
        specs=order_specs(specs), gguf=info,
    )


def _from_pretrained(folder: Path):
    """Tokenizer and float32 model of a Hugging Face folder."""
    import torch
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not load {str(folder)!r}: {e}") from None
    return tokenizer, model


# ------------------------------------------------------------------ GGUF files
#: Metadata that changes neither transformers' config nor its tokenizer of a GGUF file:
#: a re-quantized or float stand-in copy of a model shares both with its source.
_CONFIG_NEUTRAL_KEYS = frozenset({"general.file_type", "general.quantization_version"})
_CONFIG_NEUTRAL_PREFIXES = ("autobits.",)


def _config_key(source: GGUFSource) -> str:
    """What transformers derives a GGUF file's config and tokenizer from: every key/value
    but :data:`_CONFIG_NEUTRAL_KEYS`, whether the head is tied (no ``output.weight``), and
    the transformers version."""
    import transformers

    h = hashlib.sha256(f"transformers {transformers.__version__}\n".encode())
    h.update(b"tied" if all(t.name != "output.weight" for t in source.tensors) else b"untied")
    for key, value, vtype, sub in source.kv:
        if key in _CONFIG_NEUTRAL_KEYS or key.startswith(_CONFIG_NEUTRAL_PREFIXES):
            continue
        h.update(f"\0{key}\0{vtype}\0{sub}\0".encode())
        if isinstance(value, np.ndarray):
            h.update(value.tobytes())
        elif isinstance(value, list):
            for v in value:
                h.update(len(v).to_bytes(8, "little") + v)
        else:
            h.update(value if isinstance(value, bytes) else repr(value).encode())
    return h.hexdigest()[:24]


#: The vocabulary arrays of a GGUF: transformers' config does not read them (but for their
#: length, the vocabulary size), and its GGUF config reader parses them element by element.
_VOCABULARY_ARRAYS = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                "tokenizer.ggml.token_type", "tokenizer.ggml.merges"})


def _transformers_config(path: Path, source: GGUFSource):
    """transformers' config of the GGUF at ``path``.

    transformers' GGUF config reader (gguf-py's reader underneath) parses every element of
    every array, about 8 s for SmolLM2's 49,152 tokens and 48,900 merges, to use only their
    count.  It is given a copy of the file's metadata without :data:`_VOCABULARY_ARRAYS`,
    with ``{arch}.vocab_size`` set to the vocabulary's length where the file has none and
    the head's ``output.weight`` listed (one float) where the file has it: what the config
    is made from.  A config whose vocabulary size still differs is read from the file itself.
    """
    import tempfile

    import gguf
    import transformers

    arch = source.architecture
    kv = {key: value for key, value, _, _ in source.kv}
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = None if tokens is None else len(tokens)
    kwargs = {"local_files_only": True}
    with tempfile.TemporaryDirectory(prefix="autobits-gguf-config-") as tmp:
        writer = gguf.GGUFWriter(Path(tmp) / "config.gguf", arch)
        try:
            source.copy_kv(writer, skip={"general.architecture", *_VOCABULARY_ARRAYS})
            if n_vocab is not None and f"{arch}.vocab_size" not in kv:
                writer.add_uint32(f"{arch}.vocab_size", n_vocab)
            if any(t.name == "output.weight" for t in source.tensors):
                writer.add_tensor("output.weight", np.zeros(1, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        config = transformers.AutoConfig.from_pretrained(tmp, gguf_file="config.gguf", **kwargs)
    if n_vocab is not None and getattr(config, "vocab_size", None) != n_vocab:
        log.info("%s: the config read without the vocabulary arrays has vocab_size %s, not "
                 "%d; reading the whole file", path.name, getattr(config, "vocab_size", None),
                 n_vocab)
        config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name,
                                                         **kwargs)
    return config


def _config_folder(path: Path, source: GGUFSource) -> Path:
    """A folder with transformers' config and tokenizer of the GGUF at ``path``.

    transformers reads them in seconds per file (its tokenizer reads the config once more),
    so the result is kept under the autobits cache, once per :func:`_config_key`: a float
    stand-in finds its source's folder.  The weights are not in it (:func:`_fill_weights`).
    """
    import transformers

    folder = cache_dir() / "gguf-config" / f"{source.architecture}-{_config_key(source)}"
    if (folder / "config.json").is_file():
        return folder
    log.info("reading the config and tokenizer of %s with transformers (once per vocabulary "
             "and config) into %s", path.name, folder)
    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:
        config = _transformers_config(path, source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not read {str(path)!r}: {e}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with atomic_dir(folder) as tmp:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # another process wrote it meanwhile
        if not (folder / "config.json").is_file():
            raise
    return folder


def _hf_values(arch: str, name: str, values: np.ndarray, metadata: dict) -> np.ndarray:
    """A GGUF tensor's values in transformers' layout, as its GGUF loader makes them: llama's
    ``attn_q``/``attn_k`` rows un-permuted (when the file gives both head counts), Gemma's
    norms minus one."""
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = metadata.get("llama.attention.head_count")
        kv_heads = metadata.get("llama.attention.head_count_kv")
        if heads is None or kv_heads is None:
            return values
        n = kv_heads if ".attn_k." in name else heads
        rows = values.shape[0]
        return values.reshape(n, rows // n // 2, 2, *values.shape[1:]).swapaxes(2, 1) \
            .reshape(values.shape)
    if arch == "gemma3" and "norm.weight" in name:
        return values - 1
    return values


def _dequantized(t) -> np.ndarray:
    """A :class:`~autobits.gguf_scan.SourceTensor`'s values in float32, numpy order: by
    autobits' own formats where it has one (bit-identical to gguf-py's, tested, and faster),
    else by gguf-py (as transformers' loader does)."""
    import gguf

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    name = t.tensor_type.name
    if name in FORMAT_TABLE and name != "F32":
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        return get_format(name).dequantize(np.asarray(t.data).reshape(rows, -1),
                                           (rows, shape[-1])).reshape(shape)
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32) \
        .reshape(shape)


def _fill_weights(model, source: GGUFSource, arch: str, metadata: dict, path: Path) -> None:
    """Every parameter of ``model`` from its GGUF tensor in float32 (:func:`_dequantized`),
    in transformers' layout (:func:`_hf_values`)."""
    import torch

    tensors = {t.name: t for t in source.tensors}
    tied = "output.weight" not in tensors
    for hf_name, param in model.named_parameters(remove_duplicate=False):
        gname = hf_to_gguf_name(arch, hf_name)
        if gname is None:
            raise ModelLoadError(f"parameter {hf_name!r} of a {arch} model has no GGUF name")
        if gname == "output.weight" and tied:
            continue  # the same parameter as token_embd's
        t = tensors.get(gname)
        if t is None:
            raise ModelLoadError(f"{str(path)!r} lacks tensor {gname!r} ({hf_name})")
        values = _hf_values(arch, gname, _dequantized(t), metadata)
        if tuple(values.shape) != tuple(param.shape):
            raise ModelLoadError(f"{str(path)!r}: tensor {gname!r} has shape {values.shape}, "
                                 f"the {arch} config expects {tuple(param.shape)}")
        if not values.flags.writeable:  # a float32 tensor is the read-only mapped file itself
            values = values.copy()
        with torch.no_grad():
            param.copy_(torch.from_numpy(values))
    if tied:
        model.tie_weights()  # from_config under no_init_weights leaves the head its own


def _from_gguf(path: Path, info: GGUFInfo):
    """Tokenizer and float32 model of a GGUF file: the config and tokenizer from
    :func:`_config_folder`, the weights straight from the file."""
    import torch
    import transformers
    from transformers.initialization import no_init_weights

    source = GGUFSource(path)
    folder = _config_folder(path, source)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not build the model of {str(path)!r}: {e}") \
            from None
    _fill_weights(model, source, info.architecture, info.metadata, path)
    return tokenizer, model


def _safetensors_dtypes(folder: Path) -> dict[str, str]:
    """Parameter name -> stored dtype (``F32``, ``BF16``...) from the headers of a folder's
    ``*.safetensors`` files (the JSON header only; no tensor is read)."""
    out: dict[str, str] = {}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{str(f)!r} has no readable safetensors header: {e}") from None
        for k, v in header.items():
            if k != "__metadata__" and isinstance(v, dict) and "dtype" in v:
                out[k] = str(v["dtype"])
    return out


def _with_safetensors_types(specs: list[TensorSpec], folder: Path) -> list[TensorSpec]:
    """Specs of a Hugging Face folder with the dtypes its files store (the model itself is
    loaded in float32); a tensor not found in a header keeps the loaded dtype."""
    from dataclasses import replace

    stored = _safetensors_dtypes(folder)
    return [replace(s, source_type=stored[s.hf_name]) if s.hf_name in stored else s
            for s in specs]


def _reconcile_with_gguf(specs: list[TensorSpec], info: GGUFInfo) -> list[TensorSpec]:
    """Check the torch model against the file's tensor list; take source types from the file."""
    from dataclasses import replace

    out = []
    by_name = {s.name: s for s in specs}
    for gname, (shape, ttype) in info.tensors.items():
        s = by_name.get(gname)
        if s is None:
            # a tensor the torch model does not use (e.g. rope_freqs): counted, kept as is
            role = role_of(gname)
            out.append(TensorSpec(name=gname, shape=shape, role=role if role in ("norm", "bias") else "other",
                                  block=block_of(gname), source_type=ttype))
            continue
        if tuple(np.prod(shape, keepdims=True)) != tuple(np.prod(s.shape, keepdims=True)):
            raise ModelLoadError(
                f"{str(info.path)!r}: tensor {gname!r} has shape {shape} in the file but "
                f"{s.shape} in the loaded model"
            )
        out.append(replace(s, source_type=ttype))
    missing = set(by_name) - set(info.tensors)
    if missing:
        raise ModelLoadError(
            f"{str(info.path)!r}: loaded model has tensors the file does not: {sorted(missing)[:5]}"
        )
    return out
