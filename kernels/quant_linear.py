"""``QuantLinear``: an ``nn.Linear`` replacement holding packed weights, and ``swap_linears``.

``QuantLinear`` keeps ``codes`` (uint8), ``scales`` and ``zeros`` (fp16) as buffers in the
layout of :mod:`autobits.packed_layout` and multiplies through one of two backends:

* ``"triton"``: the fused dequantize + GEMV/GEMM kernels (CUDA tensors, or CPU tensors in
  Triton's interpreter mode);
* ``"torch"``: the reference (dequantize with torch ops, then ``F.linear``), bit-identical to
  the in-memory evaluation of the same allocation.

:func:`swap_linears` turns a loaded model into the model a packed checkpoint describes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from autobits.kernels import BACKENDS, triton_matmul, use_interpreter
from autobits.packed_layout import KernelError, PackedCheckpoint, PackedWeight, pack_weight
from autobits.kernels.reference import dequantize, quant_matmul_ref

__all__ = ["QuantLinear", "swap_linears"]

log = logging.getLogger(__name__)


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise KernelError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as packed ``INT{bits}_G{group}`` codes.

    ``weight`` is a :class:`~autobits.packed_layout.PackedWeight`; ``bias`` an optional float
    tensor (an ``nn.Parameter`` is kept as is, so a bias shared with other code stays shared).
    ``config`` passes explicit kernel meta-parameters to the triton backend (no autotuning).
    """

    def __init__(
        self,
        weight: PackedWeight,
        bias: torch.Tensor | None = None,
        *,
        backend: str = "torch",
        config: dict | None = None,
    ):
        super().__init__()
        weight.validate()
        self.name = weight.name
        self.bits = int(weight.bits)
        self.group = int(weight.group)
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.register_buffer("codes", weight.codes)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise KernelError(
                    f"tensor {self.name!r}: bias has shape {tuple(bias.shape)}, expected "
                    f"({self.out_features},)"
                )
            if not isinstance(bias, nn.Parameter):
                bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self.backend = _check_backend(backend)
        self.config = dict(config) if config else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        fmt: str,
        *,
        importance=None,
        backend: str = "torch",
        name: str = "weight",
    ) -> "QuantLinear":
        """Quantize ``linear.weight`` with ``fmt`` (e.g. ``"INT4_G128"``); the bias is shared."""
        pw = pack_weight(linear.weight, fmt, name=name, importance=importance)
        return cls(pw, linear.bias, backend=backend).to(linear.weight.device)

    @property
    def format(self) -> str:
        return f"INT{self.bits}_G{self.group}"

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 ``(out_features, in_features)`` weight the codes decode to."""
        return dequantize(self.codes, self.scales, self.zeros, bits=self.bits, group=self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch":
            return quant_matmul_ref(x, self.codes, self.scales, self.zeros, bits=self.bits,
                                    group=self.group, bias=self.bias)
        return triton_matmul()(x, self.codes, self.scales, self.zeros, bits=self.bits,
                               group=self.group, bias=self.bias, config=self.config)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}, bias={self.bias is not None}, backend={self.backend}")


def _modules_sharing(model: nn.Module, param: torch.Tensor):
    """(qualified name, module) of every Linear/Embedding whose weight is ``param`` (tied weights)."""
    out = []
    for mname, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, (nn.Linear, nn.Embedding)) and mod.weight is param:
            out.append((mname, mod))
    return out


def _replace(model: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def swap_linears(lm_or_model, packed: PackedCheckpoint, *, backend: str = "torch") -> list[str]:
    """Make ``lm_or_model`` (a ``LoadedModel`` or an ``nn.Module``) run the checkpoint ``packed``.

    Per tensor of the checkpoint, found through its ``hf_name``:

    * float tensors (``F32``/``F16``: norms, biases, tensors allocated to float) overwrite the
      parameter's values (``param.data``), widened to the parameter's dtype;
    * packed tensors replace every ``nn.Linear`` using that weight by a :class:`QuantLinear`
      (one set of buffers shared by tied heads); an ``nn.Embedding`` using it gets the
      dequantized float weight, since a lookup reads rows and multiplies nothing.  A tied
      embedding that the checkpoint does not allocate stays float.

    With ``backend="triton"`` and no CUDA device, Triton's interpreter is switched on (see
    :func:`autobits.kernels.use_interpreter`).  Returns the qualified names of the replaced
    modules.
    """
    _check_backend(backend)
    if backend == "triton":
        use_interpreter()  # no GPU: the kernels run in Triton's interpreter (logged)
        triton_matmul()  # fail now, not at the first forward, if triton is missing
    model = getattr(lm_or_model, "model", lm_or_model)
    if not isinstance(model, nn.Module):
        raise KernelError(f"expected a LoadedModel or an nn.Module, got {type(lm_or_model).__name__}")
    params = dict(model.named_parameters(remove_duplicate=False))

    def param_of(name: str, hf_name: str | None) -> nn.Parameter:
        if not hf_name or hf_name not in params:
            raise KernelError(
                f"tensor {name!r}: the model has no parameter {hf_name!r} (checkpoint made for "
                f"another model?)"
            )
        return params[hf_name]

    for name, fw in packed.floats.items():
        p = param_of(name, fw.hf_name)
        if p.numel() != fw.tensor.numel():
            raise KernelError(
                f"tensor {name!r}: checkpoint shape {tuple(fw.tensor.shape)} does not match the "
                f"model's {tuple(p.shape)}"
            )
        p.data = fw.tensor.to(device=p.device, dtype=p.dtype).reshape(p.shape).contiguous()

    replaced: list[str] = []
    for name, pw in packed.packed.items():
        p = param_of(name, pw.hf_name)
        if tuple(p.shape) != tuple(pw.shape):
            raise KernelError(
                f"tensor {name!r}: checkpoint shape {tuple(pw.shape)} does not match the model's "
                f"{tuple(p.shape)}"
            )
        users = _modules_sharing(model, p)
        if not users:
            raise KernelError(
                f"tensor {name!r} ({pw.hf_name}) is not the weight of an nn.Linear or nn.Embedding"
            )
        shared: QuantLinear | None = None
        for mname, mod in users:
            if isinstance(mod, nn.Embedding):
                deq = dequantize(pw.codes, pw.scales, pw.zeros, bits=pw.bits, group=pw.group)
                p.data = deq.to(device=p.device, dtype=p.dtype)
                continue
            if shared is None or mod.bias is not shared.bias:
                shared = QuantLinear(pw, mod.bias, backend=backend).to(p.device)
            _replace(model, mname, shared)
            replaced.append(mname)
    log.info("swapped %d linear modules for QuantLinear (%s backend); %d float tensors set",
             len(replaced), backend, len(packed.floats))
    return replaced
