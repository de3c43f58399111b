"""Packed checkpoints: an allocation over ``INT{B}_G{G}`` formats as safetensors + JSON manifest.

A checkpoint is a folder::

    OUT_DIR/manifest.json         version, model, architecture, allocation size, and per
                                  tensor: format, bits, group, shape, hf_name
    OUT_DIR/weights.safetensors   per packed tensor NAME (its GGUF name):
                                      NAME.codes   uint8   (N, K*bits/8)
                                      NAME.scales  float16 (N, K/group)
                                      NAME.zeros   float16 (N, K/group)
                                  per float tensor NAME: NAME (float32 or float16)

in the split layout the kernels read (:mod:`autobits.packed_layout`); the numbers are
exactly those of the format's quantizer, so the checkpoint decodes to what the in-memory
evaluator uses.  Float tensors are the quantizable tensors allocated ``F16``/``F32`` and the
tensors never quantized (norms, biases, in float32): the folder holds every weight the model
file would, so it also carries Scale-Folded norms.  ggml types (Q4_K, Q8_0, ...) belong in a
GGUF file and are refused.

The folder is written under a temporary name beside ``OUT_DIR`` and renamed into place; an
interrupted export leaves nothing behind, and an existing checkpoint is replaced whole.

Evaluating a checkpoint through the kernels (``autobits eval --packed DIR``) composes this
module with :mod:`autobits.kernels` and lives in the application layer,
:mod:`autobits.app.packed_eval`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from autobits.allocation import Allocation
from autobits.errors import AutobitsError
from autobits.io import atomic_dir
from autobits.packed_layout import (
    FloatWeight,
    KernelError,
    PackedCheckpoint,
    PackedWeight,
    parse_packed_format,
    split_blocks,
)

__all__ = [
    "PACKED_VERSION",
    "MANIFEST",
    "WEIGHTS",
    "PackedCheckpointError",
    "export_packed",
    "load_packed",
]

log = logging.getLogger(__name__)

PACKED_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FLOAT_FORMATS = {"F32": "float32", "F16": "float16"}
PARTS = ("codes", "scales", "zeros")


class PackedCheckpointError(AutobitsError):
    """A packed checkpoint that cannot be written or read (formats, files, shapes)."""


# ------------------------------------------------------------------------ writing
def _plan(lm, allocation: Allocation) -> list[tuple[object, str]]:
    """(spec, format) for every tensor to store; refuses ggml types, naming the tensor."""
    try:
        alloc = Allocation.build(lm.name, lm.specs, allocation.tensors)
    except AutobitsError as e:
        raise PackedCheckpointError(f"allocation does not fit model {lm.name!r}: {e}") from None
    plan = []
    for s in lm.specs:
        if not s.hf_name:
            log.debug("skipping %s: not a parameter of the torch model", s.name)
            continue
        fmt = alloc.tensors.get(s.name, "F32") if s.quantizable else "F32"
        if fmt not in FLOAT_FORMATS:
            try:
                parse_packed_format(fmt)
            except KernelError:
                raise PackedCheckpointError(
                    f"tensor {s.name!r} is allocated {fmt}, a ggml type: a packed checkpoint holds "
                    f"INT{{2,3,4,5,6,8}}_G{{32,64,128}} or F16/F32 (write a GGUF for ggml types)"
                ) from None
            if len(s.shape) != 2:
                raise PackedCheckpointError(
                    f"tensor {s.name!r} has shape {s.shape}; packed formats need a 2-D weight"
                )
        plan.append((s, fmt))
    return plan


def _prepare_target(out_dir: Path) -> None:
    if not out_dir.parent.is_dir():
        raise PackedCheckpointError(
            f"cannot write {str(out_dir)!r}: folder {str(out_dir.parent)!r} does not exist"
        )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise PackedCheckpointError(f"{str(out_dir)!r} exists and is not a folder")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
            raise PackedCheckpointError(
                f"{str(out_dir)!r} exists, is not empty and is not a packed checkpoint; "
                f"refusing to replace it"
            )


def export_packed(
    lm,
    allocation: Allocation,
    out_dir: str | os.PathLike,
    *,
    importance: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``allocation`` of the loaded model ``lm`` as a packed checkpoint folder ``out_dir``.

    ``importance`` maps a tensor's GGUF name to its per-input-channel importance vector, used
    by the INT formats' rounding exactly as in the evaluator's weight cache.  Returns the
    folder.  Errors (ggml types, an allocation for another model, a missing parent folder)
    are raised before anything is written.
    """
    import torch
    from safetensors.torch import save_file

    from autobits import __version__

    out_dir = Path(out_dir)
    plan = _plan(lm, allocation)
    _prepare_target(out_dir)
    importance = dict(importance or {})
    t0 = time.perf_counter()
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    quantized_bytes = 0
    for s, fmt in plan:
        ref = lm.reference_weight(s.name).detach().to("cpu", torch.float32)
        entry = {"format": fmt, "shape": list(s.shape), "hf_name": s.hf_name}
        if fmt in FLOAT_FORMATS:
            t = ref.to(getattr(torch, FLOAT_FORMATS[fmt])).contiguous()
            tensors[s.name] = t
            quantized_bytes += t.numel() * t.element_size()
        else:
            from autobits.formats import get_format

            bits, group = parse_packed_format(fmt)
            data = get_format(fmt).quantize(ref.numpy(), importance.get(s.name), tensor=s.name)
            codes, scales, zeros = split_blocks(data, bits=bits, group=group, shape=s.shape)
            for part, arr in zip(PARTS, (codes, scales, zeros)):
                tensors[f"{s.name}.{part}"] = torch.from_numpy(np.ascontiguousarray(arr))
                quantized_bytes += arr.nbytes
            entry.update(bits=bits, group=group)
        entries[s.name] = entry
    manifest = {
        "version": PACKED_VERSION,
        "kind": "autobits-packed",
        "autobits": __version__,
        "model": lm.name,
        "architecture": lm.architecture,
        "weights": WEIGHTS,
        "bytes": int(quantized_bytes),
        "allocation": {"bytes": allocation.bytes, "bpw": round(allocation.bpw, 6),
                       "meta": allocation.meta},
        "tensors": entries,
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "autobits-packed",
                                                        "version": str(PACKED_VERSION)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    n_packed = sum(1 for e in entries.values() if "bits" in e)
    log.info("packed checkpoint %s: %d tensors (%d packed), %s bytes in %.1fs",
             out_dir, len(entries), n_packed, f"{quantized_bytes:,}", time.perf_counter() - t0)
    return out_dir


# ------------------------------------------------------------------------ reading
def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise PackedCheckpointError(f"packed checkpoint folder {str(folder)!r} does not exist")
    path = folder / MANIFEST
    if not path.is_file():
        raise PackedCheckpointError(f"{str(folder)!r} has no {MANIFEST}: not a packed checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackedCheckpointError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), dict):
        raise PackedCheckpointError(f"{str(path)!r} must be a JSON object with a 'tensors' mapping")
    if manifest.get("version") != PACKED_VERSION:
        raise PackedCheckpointError(
            f"{str(path)!r} has version {manifest.get('version')!r}, expected {PACKED_VERSION}"
        )
    return manifest


def _entry_shape(name: str, entry) -> tuple[int, ...]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise PackedCheckpointError(f"manifest entry of {name!r} has no valid 'shape': {shape!r}")
    return tuple(shape)


def _get(tensors: dict, key: str, name: str, dtype, shape: tuple[int, ...]):
    if key not in tensors:
        raise PackedCheckpointError(f"tensor {name!r}: {WEIGHTS} has no {key!r}")
    t = tensors.pop(key)
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise PackedCheckpointError(
            f"tensor {name!r}: {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}"
        )
    return t


def load_packed(out_dir: str | os.PathLike) -> PackedCheckpoint:
    """Read and validate a packed checkpoint folder written by :func:`export_packed`.

    Every manifest entry must have its arrays in the safetensors file with the dtypes and
    shapes its format and shape imply, and the file must hold nothing else; otherwise a
    :class:`PackedCheckpointError` names the tensor and the numbers.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(out_dir)
    manifest = _read_manifest(folder)
    wpath = folder / str(manifest.get("weights", WEIGHTS))
    if not wpath.is_file():
        raise PackedCheckpointError(f"{str(folder)!r} has a manifest but no {wpath.name}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise PackedCheckpointError(f"{str(wpath)!r} is not a readable safetensors file: {e}") from None
    ckpt = PackedCheckpoint(manifest=manifest)
    for name, entry in manifest["tensors"].items():
        shape = _entry_shape(name, entry)
        fmt = str(entry.get("format"))
        hf_name = entry.get("hf_name")
        if fmt in FLOAT_FORMATS:
            t = _get(tensors, name, name, getattr(torch, FLOAT_FORMATS[fmt]), shape)
            ckpt.floats[name] = FloatWeight(name=name, format=fmt, tensor=t, hf_name=hf_name)
            continue
        try:
            bits, group = parse_packed_format(fmt)
        except KernelError:
            raise PackedCheckpointError(
                f"manifest entry of {name!r} has format {fmt!r}; expected INT{{B}}_G{{G}}, F16 or F32"
            ) from None
        if (entry.get("bits"), entry.get("group")) != (bits, group):
            raise PackedCheckpointError(
                f"manifest entry of {name!r}: bits/group {entry.get('bits')}/{entry.get('group')} "
                f"disagree with format {fmt}"
            )
        if len(shape) != 2 or shape[1] % group:
            raise PackedCheckpointError(
                f"tensor {name!r}: shape {shape} is not 2-D with rows a multiple of {group}"
            )
        n, k = shape
        codes = _get(tensors, f"{name}.codes", name, torch.uint8, (n, k * bits // 8))
        scales = _get(tensors, f"{name}.scales", name, torch.float16, (n, k // group))
        zeros = _get(tensors, f"{name}.zeros", name, torch.float16, (n, k // group))
        ckpt.packed[name] = PackedWeight(name=name, bits=bits, group=group, shape=(n, k),
                                         codes=codes, scales=scales, zeros=zeros, hf_name=hf_name)
    if tensors:
        extra = sorted(tensors)
        raise PackedCheckpointError(
            f"{str(wpath)!r} holds {len(extra)} array(s) the manifest does not list: {extra[:5]}"
        )
    return ckpt
