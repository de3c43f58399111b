"""Evaluating a packed checkpoint through the kernels: ``autobits eval --packed DIR``.

The model is loaded, its reference computed, its linear layers swapped for ``QuantLinear``
(triton or torch backend) and the metrics measured exactly as for an in-memory allocation.
This composes the checkpoint reader (:mod:`autobits.exports.packed`) with the kernels
(:mod:`autobits.kernels`), so it sits in the application layer above both.
"""

from __future__ import annotations

from pathlib import Path

from autobits.allocation import Allocation
from autobits.errors import AutobitsError
from autobits.exports.packed import PackedCheckpointError, load_packed

__all__ = ["evaluate_packed"]


def evaluate_packed(
    packed_dir: str | os.PathLike,
    *,
    backend: str = "triton",
    model: str | None = None,
    text: str = "stdlib",
    ctx: int = 512,
    windows: int = 8,
):
    """Metrics of a packed checkpoint on held-out windows, as ``autobits eval`` measures them.

    Loads ``model`` (default: the manifest's), computes the float reference, swaps in the
    checkpoint's tensors (:func:`autobits.kernels.quant_linear.swap_linears`) and scores the
    swapped model.  With ``backend="triton"`` and no GPU the kernels run in Triton's
    interpreter (slow: use few, short windows).  Returns ``(metrics, split, lm)``.
    """
    from autobits.evaluate import Evaluator
    from autobits.kernels import BACKENDS, triton_matmul, use_interpreter
    from autobits.model import load_model
    from autobits.text import load_text, make_windows

    if backend not in BACKENDS:
        raise PackedCheckpointError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if windows < 1:
        raise PackedCheckpointError(f"windows must be at least 1, got {windows}")
    ckpt = load_packed(packed_dir)
    if backend == "triton":
        use_interpreter()
        triton_matmul()  # a missing triton fails before the model is loaded
    from autobits.kernels.quant_linear import swap_linears

    lm = load_model(model or ckpt.model)
    quantizable = {s.name for s in lm.specs if s.quantizable}
    formats = {n: f for n, f in ckpt.formats.items() if n in quantizable}
    try:
        alloc = Allocation.build(lm.name, lm.specs, formats, meta={"rule": Path(packed_dir).name})
    except AutobitsError as e:
        raise PackedCheckpointError(
            f"checkpoint {str(packed_dir)!r} does not match model {lm.name!r}: {e}"
        ) from None
    corpus = load_text(text)
    split = make_windows(corpus, lm.tokenizer, ctx=ctx).split(calib=0, eval=windows)

    class _Swapped(Evaluator):
        def apply(self, tensors):  # the checkpoint is already in the model
            pass

    ev = _Swapped(lm, split.eval)
    swap_linears(lm, ckpt, backend=backend)
    return ev.evaluate(alloc), split, lm
