"""Load a real model offline: a GGUF file or a Hugging Face folder -> torch model + specs.

The reference weights are the loaded model's own: for a GGUF source, its tensors
dequantized by transformers (through gguf-py).  Every tensor of the model file is described
by a :class:`~autobits.specs.TensorSpec` under its GGUF name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autobits.errors import ModelLoadError
from autobits.gguf_scan import scan_gguf_header, tensor_table
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
        kwargs: dict[str, Any] = {"local_files_only": True}
        info = None
        src_dir = path
    else:
        info = read_gguf_header(path)
        arch = info.architecture
        src_dir = _converted_folder(path)
        kwargs = {"local_files_only": True}
    log.debug("loading %s (%s) from %s", name_or_path, arch, path)
    tokenizer, model = _from_pretrained(src_dir, path, kwargs)
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


def _from_pretrained(src_dir: Path, path: Path, kwargs: dict):
    import torch
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(src_dir, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src_dir, dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not load {str(path)!r}: {e}") from None
    return tokenizer, model


def _file_key(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:24]


def _converted_folder(path: Path) -> Path:
    """A Hugging Face folder holding the GGUF's dequantized weights and its tokenizer.

    transformers' GGUF path dequantizes in Python and rebuilds the tokenizer from the
    vocabulary every time (tens of seconds); the result is kept once per file content
    (sha256) under the autobits cache, written to a temporary folder and renamed.
    """
    folder = cache_dir() / "converted" / f"{path.stem}-{_file_key(path)}"
    if (folder / "config.json").is_file():
        return folder
    import torch

    log.info("converting %s to a float32 folder in %s (once per file)", path.name, folder)
    tokenizer, model = _from_pretrained(
        path.parent, path, {"gguf_file": path.name, "local_files_only": True}
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        # the weights are plain float32 now; drop transformers' "loaded from GGUF" marker,
        # which refuses serialisation
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.to(torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
