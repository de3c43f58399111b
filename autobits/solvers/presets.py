"""llama.cpp's preset rules (``llama-quantize <ftype>``), ported to TensorSpecs.

Ported from ``src/llama-quant.cpp`` of ggml-org/llama.cpp at commit
``007dbbf3fd17eefe9b47fee45f48f7ba5e62b714`` (functions ``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type`` and
``init_quantize_state_counters``).  That is the generation that llama-cpp-python 0.3.36
vendors (its ggml reports commit ``0c1e570``), and the tests check this port against that
library's own ``llama_model_quantize`` when it is installed.

What is ported, for dense (non-MoE) models and the presets in :data:`PRESETS`:

* the default type of each ftype (``Q4_K_M`` -> Q4_K, ``Q3_K_L`` -> Q3_K, ...);
* ``output.weight`` -- and ``token_embd.weight`` when the model has no ``output.weight``
  (tied embeddings, llama.cpp's ``has_tied_embeddings``) -- gets Q8_0 when its row is not a
  multiple of the default type's block size (or the arch is falcon), else Q6_K unless the
  default type is Q8_0;
* ``attn_v`` (counted in file order, ``i_attention_wv`` of ``n_attention_wv``): Q2_K ->
  Q4_K if ``n_gqa >= 4`` else Q3_K; Q3_K_M -> Q5_K for the first two, then Q4_K; Q3_K_L ->
  Q5_K; Q4_K_M / Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K for the first four;
* ``ffn_down`` (layer ``i`` of ``n_layers``): Q2_K -> Q3_K; Q3_K_M -> Q5_K below
  ``n/16`` then Q4_K (falcon: Q3_K off ``use_more_bits``); Q3_K_L -> Q5_K (falcon Q4_K);
  Q4_K_M -> Q6_K where ``use_more_bits`` (falcon: Q6_K below ``n/16``, Q5_K where
  ``use_more_bits``, else Q4_K); Q5_K_M -> Q6_K where ``use_more_bits``; Q4_K_S -> Q5_K below
  ``n/8`` (not falcon); Q4_0 / Q5_0 with an imatrix -> Q4_1 / Q5_1 below ``n/8``;
* ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K, Q3_K_L -> Q5_K (falcon: Q3_K_L -> Q4_K);
* ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division);
* the shape fallback when a row is not a multiple of the chosen type's block size:
  Q2_K, Q3_K -> Q4_0; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0 (:data:`FALLBACK`), and F16
  when the fallback does not fit either (``autobits.allocation.LLAMA_FALLBACK``; newer
  llama.cpp falls back from Q2_K/Q3_K to IQ4_NL, the llama.cpp that judges our files uses
  Q4_0).

Not ported, because no dense model on these presets reaches them: the MoE rules
(``n_expert == 8`` bumps to Q8_0 / Q5_K), the LLaMA-2-70B ``attn_v`` bump
(``LLM_TYPE_70B``), fused ``attn_qkv`` / ``attn_kv_b`` tensors, and every IQ/TQ/MXFP4 ftype.
Within the ported presets every rule picks a type autobits has (Q2_K..Q8_0, F16), so no IQ
type ever needs mapping; the only other type reached is Q4_0/Q5_0/Q5_1/Q8_0 via the fallback.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from autobits.allocation import LLAMA_FALLBACK
from autobits.candidates import CandidateTable
from autobits.errors import AllocationError, BudgetError
from autobits.formats import get_format
from autobits.specs import TensorSpec

__all__ = [
    "PRESETS",
    "FALLBACK",
    "use_more_bits",
    "llama_fallback",
    "infer_n_layers",
    "infer_n_gqa",
    "llamacpp",
    "best_llamacpp",
    "pick_llamacpp",
]

#: llama-quantize ftype -> its default tensor type (``llama_ftype_get_default_type``).
PRESETS: dict[str, str] = {
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q5_1": "Q5_1",
    "Q5_0": "Q5_0",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_1": "Q4_1",
    "Q4_0": "Q4_0",
    "Q3_K_L": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K",
}
#: ``tensor_type_fallback``: the type used when a K-quant does not fit a row (then F16).
FALLBACK: dict[str, str] = LLAMA_FALLBACK
_UNQUANTIZED = ("F32", "F16", "BF16")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pattern: the first and last eighth, and every third layer between."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def llama_fallback(fmt: str, row_length: int) -> str:
    """The type llama.cpp stores a row of ``row_length`` in when it picked ``fmt``.

    ``fmt`` itself when its block size divides the row; else :data:`FALLBACK` (Q4_K ->
    Q5_0, ...), and F16 when that does not fit either or ``fmt`` has no fallback.
    """
    name = get_format(fmt).name
    if get_format(name).fits(row_length):
        return name
    alt = FALLBACK.get(name)
    if alt is not None and get_format(alt).fits(row_length):
        return alt
    return "F16"


def infer_n_layers(specs: Sequence[TensorSpec]) -> int:
    """Number of transformer blocks: one more than the largest block index in ``specs``."""
    blocks = [s.block for s in specs if s.block is not None]
    if not blocks:
        raise ValueError("cannot infer n_layers: no tensor of the spec list belongs to a block")
    return max(blocks) + 1


def infer_n_gqa(specs: Sequence[TensorSpec]) -> int:
    """Query heads per KV head: rows of ``attn_q`` over rows of ``attn_k`` (1 when unknown)."""
    q = {s.block: s.shape[0] for s in specs if s.role == "attn_q"}
    k = {s.block: s.shape[0] for s in specs if s.role == "attn_k"}
    common = sorted(set(q) & set(k))
    if not common:
        return 1
    b = common[0]
    return max(1, int(q[b]) // int(k[b]))


def _file_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    # llama_model_loader::weights_map sorts by block index (globals first), then by name
    return sorted(specs, key=lambda s: (-1 if s.block is None else s.block, s.name))


def llamacpp(
    specs: Sequence[TensorSpec],
    preset: str,
    *,
    n_layers: int | None = None,
    n_gqa: int | None = None,
    arch: str = "llama",
    imatrix: bool = False,
) -> dict[str, str]:
    """The tensor -> format choice ``llama-quantize`` makes for ``preset`` (e.g. ``"Q4_K_M"``).

    ``n_layers`` is the model's block count (``hparams.n_layer``; inferred from the block
    indices when None), ``n_gqa`` its query heads per KV head (inferred from the ``attn_q``
    / ``attn_k`` shapes when None), ``arch`` the GGUF architecture (only ``"falcon"``
    changes rules), ``imatrix`` whether llama.cpp would be given an importance matrix.
    Returns a format for every quantizable tensor of ``specs``.
    """
    key = str(preset).upper()
    if key not in PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; expected one of {', '.join(PRESETS)}")
    default = PRESETS[key]
    n_layers = infer_n_layers(specs) if n_layers is None else int(n_layers)
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got n_layers={n_layers}")
    n_gqa = infer_n_gqa(specs) if n_gqa is None else int(n_gqa)
    falcon = arch.lower() == "falcon"
    quant = [s for s in specs if s.quantizable]
    has_output = any(s.role == "output" for s in quant)
    n_attention_wv = sum(1 for s in quant if s.role == "attn_v")
    i_wv = i_down = 0
    out: dict[str, str] = {}
    for s in _file_order(quant):
        t = default
        if default in _UNQUANTIZED:  # ggml_is_quantized(default) is false: no rules, no fallback
            out[s.name] = t
            continue
        role = s.role
        if role == "output" or (role == "token_embd" and not has_output):
            if falcon or s.row_length % get_format(default).block_size != 0:
                t = "Q8_0"
            elif default != "Q8_0":
                t = "Q6_K"
        elif role == "attn_v":
            if key == "Q2_K":
                t = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif key == "Q3_K_M":
                t = "Q5_K" if i_wv < 2 else "Q4_K"
            elif key == "Q3_K_L":
                t = "Q5_K"
            elif key in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_wv, n_attention_wv):
                t = "Q6_K"
            elif key == "Q4_K_S" and i_wv < 4:
                t = "Q5_K"
            i_wv += 1
        elif role == "ffn_down":
            i, n = i_down, n_layers
            if key == "Q2_K":
                t = "Q3_K"
            elif key == "Q3_K_M":
                t = "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or use_more_bits(i, n) else "Q3_K")
            elif key == "Q3_K_L":
                t = "Q4_K" if falcon else "Q5_K"
            elif key == "Q4_K_M":
                if falcon:
                    t = "Q6_K" if i < n // 16 else ("Q5_K" if use_more_bits(i, n) else "Q4_K")
                elif use_more_bits(i, n):
                    t = "Q6_K"
            elif key == "Q5_K_M" and use_more_bits(i, n):
                t = "Q6_K"
            elif key == "Q4_K_S" and not falcon and i < n // 8:
                t = "Q5_K"
            elif key in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
                t = "Q4_1" if key == "Q4_0" else "Q5_1"
            i_down += 1
        elif role == "attn_output":
            if not falcon:
                t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(key, t)
            elif key == "Q3_K_L":
                t = "Q4_K"
        out[s.name] = llama_fallback(t, s.row_length)
    return {s.name: out[s.name] for s in quant}


def best_llamacpp(
    table: CandidateTable,
    limit_bytes: int,
    *,
    presets: Sequence[str] | None = None,
    n_layers: int | None = None,
    n_gqa: int | None = None,
    arch: str = "llama",
    imatrix: bool = False,
) -> dict[str, str]:
    """The choice of the largest llama.cpp preset whose file fits ``limit_bytes``.

    Presets that pick a format the table does not offer for some tensor are skipped.  A
    :class:`BudgetError` names the smallest preset's size when none fits.
    :func:`pick_llamacpp` also returns the preset's name.
    """
    return pick_llamacpp(table, limit_bytes, presets=presets, n_layers=n_layers, n_gqa=n_gqa,
                         arch=arch, imatrix=imatrix)[1]


def pick_llamacpp(
    table: CandidateTable,
    limit_bytes: int,
    *,
    presets: Sequence[str] | None = None,
    n_layers: int | None = None,
    n_gqa: int | None = None,
    arch: str = "llama",
    imatrix: bool = False,
) -> tuple[str, dict[str, str]]:
    """:func:`best_llamacpp` as ``(preset, choice)``."""
    names = list(PRESETS) if presets is None else [str(p).upper() for p in presets]
    sized: list[tuple[int, str, dict[str, str]]] = []
    skipped: list[str] = []
    for p in names:
        choice = llamacpp(table.specs, p, n_layers=n_layers, n_gqa=n_gqa, arch=arch, imatrix=imatrix)
        try:
            sized.append((table.choice_bytes(choice), p, choice))
        except AllocationError:
            skipped.append(p)
    if not sized:
        raise AllocationError(
            f"no llama.cpp preset of {names} uses only formats the candidate table offers"
        )
    fitting = [x for x in sized if x[0] <= limit_bytes]
    if not fitting:
        small = min(sized, key=lambda x: x[0])
        raise BudgetError(
            f"no llama.cpp preset fits {int(limit_bytes)} bytes "
            f"({limit_bytes * 8 / table.params:.3f} bpw): the smallest, {small[1]}, needs "
            f"{small[0]} bytes ({small[0] * 8 / table.params:.3f} bpw)"
        )
    nbytes, p, choice = max(fitting, key=lambda x: x[0])
    return p, choice
