"""autobits.kernels: Triton kernels for packed mixed-bit weights, their torch reference, QuantLinear.

* the split layout the kernels read (``codes``, ``scales``, ``zeros``) and its conversion from
  the ``INT{B}_G{G}`` formats live in core, :mod:`autobits.packed_layout` (the packed-checkpoint
  writer in :mod:`autobits.exports.packed` uses them too).
* :mod:`~autobits.kernels.reference`: dequantize-then-matmul in torch (CPU path, test oracle).
* :mod:`~autobits.kernels.triton_kernels`: fused dequantize + GEMV/GEMM Triton kernels.
* :mod:`~autobits.kernels.quant_linear`: ``QuantLinear`` and ``swap_linears``.

Triton is optional (the ``triton`` extra).  Without a GPU the kernels run in Triton's
interpreter on CPU tensors; that mode is fixed when the kernels module is first imported,
so call :func:`use_interpreter` (or set ``TRITON_INTERPRET=1``) before :func:`triton_matmul`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from autobits.packed_layout import KernelError

__all__ = [
    "BACKENDS",
    "triton_available",
    "use_interpreter",
    "triton_matmul",
]

log = logging.getLogger(__name__)

#: Backends of :class:`~autobits.kernels.quant_linear.QuantLinear`.
BACKENDS: tuple[str, ...] = ("triton", "torch")
_KERNELS = "autobits.kernels.triton_kernels"


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it may still lack a GPU)."""
    return importlib.util.find_spec("triton") is not None


def use_interpreter() -> bool:
    """Run the kernels in Triton's interpreter when there is no CUDA device; return whether it is on.

    Sets ``TRITON_INTERPRET=1`` if no GPU is visible and the kernels are not defined yet.
    Once the kernels module is imported its mode is fixed; a later call reports it.
    """
    if _KERNELS in sys.modules:
        return bool(sys.modules[_KERNELS].INTERPRET)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        log.info("no CUDA device: Triton kernels run in interpreter mode (TRITON_INTERPRET=1, slow)")
        return True
    return False


def triton_matmul():
    """The Triton ``quant_matmul`` (imports the kernels; clear error if Triton is missing)."""
    if not triton_available():
        raise KernelError(
            "the triton backend needs the triton package: pip install 'autobits[triton]' "
            "(or use the torch backend)"
        )
    from autobits.kernels.triton_kernels import quant_matmul

    return quant_matmul
