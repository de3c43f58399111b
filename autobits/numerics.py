"""llama.cpp's CPU matmul numerics, emulated in torch.

llama.cpp never multiplies a quantized weight by float activations: its CPU backend first
converts the activation row to the weight type's ``vec_dot_type`` (ggml's
``type_traits_cpu``) and takes an integer dot product. For the types autobits writes:

================================  ============  =======  ======================
weight types                      vec_dot_type  block    scale
================================  ============  =======  ======================
Q4_0, Q5_0, Q8_0, IQ4_NL          Q8_0          32       fp16 ``amax / 127``
Q4_1, Q5_1                        Q8_1          32       fp16 ``amax / 127``
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K      Q8_K          256      fp32 ``amax / 127``
F16 / BF16                        F16 / BF16    -        -
F32 (and packed ``INT*`` types)   -             -        -
================================  ============  =======  ======================

:class:`ActivationQuantizer` puts that rounding in front of every linear layer (the tied
output head included) according to the format its weight currently has, so that
``Evaluator(..., llama_numerics=True)`` measures what llama.cpp measures. On SmolLM2 this
moves our perplexity onto llama.cpp's (with an F32 KV cache) to within a few tenths of a
percent; without it, uniform Q8_0 reads about 1% better in torch than in llama.cpp.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Mapping

from autobits.model import LoadedModel

__all__ = ["VecDot", "VEC_DOT", "ActivationQuantizer", "fake_quantize_q8"]

Q8_MAX = 127.0  # ggml's 8-bit activation blocks are symmetric: codes in [-127, 127]


@dataclass(frozen=True)
class VecDot:
    """How llama.cpp rounds the activations multiplied by one weight type."""

    kind: str  # "q8", "f16", "bf16"
    block: int = 0  # activations per scale (q8 only)
    fp16_scale: bool = False  # the scale itself is stored as fp16 (Q8_0 / Q8_1)


_Q8_0 = VecDot("q8", 32, True)
_Q8_K = VecDot("q8", 256, False)
VEC_DOT: dict[str, VecDot] = {
    **{t: _Q8_0 for t in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q4_1", "Q5_1")},
    **{t: _Q8_K for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")},
    "F16": VecDot("f16"),
    "BF16": VecDot("bf16"),
}


def fake_quantize_q8(x, block: int, fp16_scale: bool):
    """``x`` rounded as llama.cpp's ``quantize_row_q8_*`` would, returned dequantized.

    The last dimension of ``x`` must be a multiple of ``block``.
    """
    import torch

    if x.shape[-1] % block:
        raise ValueError(f"activation row length {x.shape[-1]} is not a multiple of block size {block}")
    xb = x.reshape(-1, block)
    d = xb.abs().amax(-1, keepdim=True) / Q8_MAX
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp_(-Q8_MAX, Q8_MAX)  # codes from the fp32 scale, as ggml
    if fp16_scale:
        d = d.half().to(x.dtype)  # ... which then stores (and multiplies by) the fp16 scale
    return (q * d).reshape(x.shape)


class ActivationQuantizer:
    """Forward pre-hooks that round each linear layer's input per its weight's format.

    ``formats`` (set through :meth:`set`) maps GGUF tensor names to format names; tensors not
    in it (the reference weights) get float activations. :meth:`remove` takes the hooks off.
    """

    def __init__(self, lm: LoadedModel) -> None:
        import torch

        by_param = {s.hf_name: s.name for s in lm.specs if s.hf_name}
        head = lm.model.get_output_embeddings()
        embd = next((s.name for s in lm.specs if s.role == "token_embd"), None)
        self._formats: dict[str, str] = {}
        self._handles = []
        #: per thread, the last input rounded: (input, rounding, rounded input)
        self._last = threading.local()
        for mname, mod in lm.model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            name = by_param.get(f"{mname}.weight")
            if name is None and mod is head:
                name = next((s.name for s in lm.specs if s.role == "output"), embd)
            if name is not None:
                self._handles.append(mod.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_mod, args):
            vd = VEC_DOT.get(self._formats.get(name, "F32"))
            if vd is None:
                return None
            x = args[0]
            # q/k/v (and gate/up) read one input: rounded once per thread when their
            # formats round it alike.  The input tensor itself is the key (held, so never
            # another's): a layer's input is not modified in place while its backward could
            # still need it, so the same tensor holds the same values.
            key = (vd.kind, vd.block, vd.fp16_scale)
            last = getattr(self._last, "item", None)
            if last is not None and last[0] is x and last[1] == key:
                return (last[2],) + args[1:]
            if vd.kind == "f16":
                y = x.half().to(x.dtype)
            elif vd.kind == "bf16":
                y = x.bfloat16().to(x.dtype)
            else:
                y = fake_quantize_q8(x, vd.block, vd.fp16_scale)
            self._last.item = (x, key, y)
            return (y,) + args[1:]

        return hook

    def set(self, formats: Mapping[str, str]) -> None:
        self._formats = dict(formats)
        self._last = threading.local()

    def clear(self) -> None:
        self._formats = {}
        self._last = threading.local()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = threading.local()
