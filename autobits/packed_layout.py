"""The split layout of packed weights that the kernels read, and conversion from the INT formats.

:mod:`autobits.formats.packed` stores an ``INT{B}_G{G}`` tensor as interleaved blocks (fp16
scale, fp16 zero, ``G*B/8`` code bytes per group).  The kernels read the same numbers split
into three arrays, for a weight of shape ``(N, K)`` (``N`` output features, ``K`` input
features, rows along ``K`` as in ``nn.Linear.weight``)::

    codes   uint8   (N, K*B/8)   row n's codes as one little-endian bit stream:
                                 code k occupies stream bits k*B .. k*B+B-1, stream bit j
                                 is bit j%8 of byte j//8 (least significant bit first)
    scales  float16 (N, K/G)     scale of group g = k // G of row n
    zeros   float16 (N, K/G)     zero of that group

    w[n, k] = float32(q[n, k]) * float32(scales[n, k//G]) + float32(zeros[n, k//G])

Because ``G*B`` is a multiple of 8 for every format, the code bytes of consecutive groups
concatenate into exactly that stream: ``codes[n]`` is the code bytes of the blocks of row
``n`` laid end to end.  For ``B`` in {3, 5, 6} a code may straddle two bytes (byte
``k*B // 8`` and the next); for ``B`` in {2, 4, 8} it never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autobits.errors import AutobitsError
from autobits.formats import get_format

__all__ = [
    "BITS",
    "GROUPS",
    "KernelError",
    "PackedWeight",
    "FloatWeight",
    "PackedCheckpoint",
    "packed_format_name",
    "parse_packed_format",
    "split_blocks",
    "join_blocks",
    "pack_weight",
]

#: Bit widths and group sizes of the ``INT{B}_G{G}`` formats.
BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
GROUPS: tuple[int, ...] = (32, 64, 128)


class KernelError(AutobitsError):
    """Packed weights or activations the kernels cannot take (shape, dtype, device, format)."""


def packed_format_name(bits: int, group: int) -> str:
    """``(4, 128) -> "INT4_G128"`` (error for a combination that is not a format)."""
    if bits not in BITS or group not in GROUPS:
        raise KernelError(
            f"no packed format with bits={bits}, group={group}; bits must be one of {BITS} "
            f"and group one of {GROUPS}"
        )
    return f"INT{bits}_G{group}"


def parse_packed_format(name: str) -> tuple[int, int]:
    """``"INT4_G128" -> (4, 128)``; a :class:`KernelError` for anything else."""
    key = str(name).upper()
    try:
        head, g = key.split("_G")
        bits, group = int(head.removeprefix("INT")), int(g)
        if not head.startswith("INT"):
            raise ValueError
    except ValueError:
        raise KernelError(f"{name!r} is not a packed INT{{B}}_G{{G}} format") from None
    packed_format_name(bits, group)
    return bits, group


def split_blocks(data: np.ndarray, *, bits: int, group: int, shape: tuple[int, int]):
    """Interleaved ``INT{bits}_G{group}`` bytes of a ``(N, K)`` tensor -> ``codes, scales, zeros``.

    ``data`` is what :meth:`autobits.formats.Format.quantize` returns (uint8, any shape with
    ``N*K/group*type_size`` bytes).  Returns numpy arrays in the kernel layout (module doc).
    """
    n, k = (int(s) for s in shape)
    if k % group:
        raise KernelError(f"row length {k} is not a multiple of group size {group}")
    code_bytes = group * bits // 8
    type_size = 4 + code_bytes
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    need = n * (k // group) * type_size
    if raw.size != need:
        raise KernelError(
            f"INT{bits}_G{group} data for shape {(n, k)} must be {need} bytes, got {raw.size}"
        )
    blocks = raw.reshape(n, k // group, type_size)
    scales = np.ascontiguousarray(blocks[:, :, 0:2]).view("<f2").reshape(n, k // group)
    zeros = np.ascontiguousarray(blocks[:, :, 2:4]).view("<f2").reshape(n, k // group)
    codes = np.ascontiguousarray(blocks[:, :, 4:]).reshape(n, k * bits // 8)
    return codes, scales.astype(np.float16), zeros.astype(np.float16)


def join_blocks(codes, scales, zeros, *, bits: int, group: int) -> np.ndarray:
    """Inverse of :func:`split_blocks`: uint8 ``(N, K/group * type_size)`` interleaved bytes."""
    codes = np.ascontiguousarray(np.asarray(codes), dtype=np.uint8)
    n = codes.shape[0]
    n_groups = np.asarray(scales).shape[1]
    s = np.ascontiguousarray(np.asarray(scales, dtype="<f2")).view(np.uint8)
    z = np.ascontiguousarray(np.asarray(zeros, dtype="<f2")).view(np.uint8)
    return np.concatenate(
        [s.reshape(n, n_groups, 2), z.reshape(n, n_groups, 2),
         codes.reshape(n, n_groups, group * bits // 8)],
        axis=2,
    ).reshape(n, -1)


@dataclass
class PackedWeight:
    """One ``INT{bits}_G{group}`` weight of shape ``(N, K)`` in the kernel layout (torch tensors)."""

    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    bits: int
    group: int
    shape: tuple[int, int]
    codes: "object"  # torch.uint8 (N, K*bits/8)
    scales: "object"  # torch.float16 (N, K/group)
    zeros: "object"  # torch.float16 (N, K/group)
    hf_name: str | None = None

    @property
    def format(self) -> str:
        return packed_format_name(self.bits, self.group)

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.shape[1])

    def validate(self) -> "PackedWeight":
        """Check dtypes and shapes of the three arrays against ``bits``, ``group``, ``shape``."""
        import torch

        packed_format_name(self.bits, self.group)
        if len(self.shape) != 2:
            raise KernelError(f"tensor {self.name!r}: packed weights are 2-D, got shape {self.shape}")
        n, k = self.shape
        if k % self.group:
            raise KernelError(
                f"tensor {self.name!r}: row length {k} is not a multiple of group size {self.group}"
            )
        want = {
            "codes": ((n, k * self.bits // 8), torch.uint8),
            "scales": ((n, k // self.group), torch.float16),
            "zeros": ((n, k // self.group), torch.float16),
        }
        for part, (shp, dt) in want.items():
            t = getattr(self, part)
            if not isinstance(t, torch.Tensor):
                raise KernelError(f"tensor {self.name!r}: {part} must be a torch tensor, got {type(t)}")
            if tuple(t.shape) != shp or t.dtype != dt:
                raise KernelError(
                    f"tensor {self.name!r} ({self.format}, shape {tuple(self.shape)}): {part} must "
                    f"be {dt} {shp}, got {t.dtype} {tuple(t.shape)}"
                )
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


@dataclass
class FloatWeight:
    """A tensor kept in float (``F32``/``F16``): allocated so, or a norm/bias never quantized."""

    name: str
    format: str  # "F32" or "F16": the precision of ``tensor``
    tensor: "object"  # torch tensor of the stored dtype
    hf_name: str | None = None


@dataclass
class PackedCheckpoint:
    """A loaded packed checkpoint: its manifest and its tensors by GGUF name."""

    manifest: dict
    packed: dict[str, PackedWeight] = field(default_factory=dict)
    floats: dict[str, FloatWeight] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.manifest.get("model"))

    @property
    def formats(self) -> dict[str, str]:
        """GGUF name -> format of every tensor (packed and float)."""
        out = {n: w.format for n, w in self.packed.items()}
        out.update({n: w.format for n, w in self.floats.items()})
        return out


def pack_weight(
    weight, fmt: str, *, name: str = "weight", importance=None, hf_name: str | None = None
) -> PackedWeight:
    """Quantize a float ``(N, K)`` weight with ``fmt`` (``INT{B}_G{G}``) into a :class:`PackedWeight`.

    The codes, scales and zeros are exactly those of ``autobits.formats.get_format(fmt).quantize``
    (with ``importance``, the per-input-channel importance vector, when given).
    """
    import torch

    bits, group = parse_packed_format(fmt)
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to("cpu", torch.float32).numpy()
    arr = np.ascontiguousarray(weight, dtype=np.float32)
    if arr.ndim != 2:
        raise KernelError(f"tensor {name!r}: packed weights are 2-D, got shape {arr.shape}")
    data = get_format(fmt).quantize(arr, importance, tensor=name)
    codes, scales, zeros = split_blocks(data, bits=bits, group=group, shape=arr.shape)
    return PackedWeight(
        name=name, bits=bits, group=group, shape=(int(arr.shape[0]), int(arr.shape[1])),
        codes=torch.from_numpy(codes), scales=torch.from_numpy(scales),
        zeros=torch.from_numpy(zeros), hf_name=hf_name,
    )
