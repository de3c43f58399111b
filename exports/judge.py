"""The independent judge: perplexity, KLD and top-1 agreement of a GGUF file, in llama.cpp.

llama.cpp runs through ``llama-cpp-python`` (the ``judge`` extra).  Scoring follows
``llama-perplexity``: each window of ``ctx`` tokens is evaluated from an empty KV cache
(``n_ctx = n_batch = ctx``, logits for every position) and only the second half is scored
(positions ``ctx/2 .. ctx-2`` predicting the next token), exactly the positions
:class:`autobits.evaluate.Evaluator` scores.  With a reference file, both models see the
same windows and the per-token KL(reference || judged) and argmax agreement are averaged,
as ``llama-perplexity --kl-divergence`` does (there through a saved logits file, here with
both models loaded at once).

Flash attention is one explicit flag, applied to both models: ``llama-perplexity`` turns
it on by default, the Python binding leaves it off; a comparison must use one setting.
The KV cache type is another (``kv_type``): llama.cpp stores K and V in F16 by default;
``"f32"`` removes that rounding, which is what a comparison with the float evaluator wants
(on a mixed SmolLM2 allocation the F16 cache alone moves perplexity by 1.6%).

Windows come from :func:`autobits.text.make_windows` over the judged file's own
llama.cpp tokenizer (:class:`LlamaTokenizer`), so they are the token ids llama.cpp itself
would produce; the last ``n`` windows (held out, ``Windows.split(calib=0, eval=n)``) are used.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autobits.errors import AutobitsError
from autobits.io import atomic_path

__all__ = [
    "JudgeError",
    "JudgeResult",
    "LlamaTokenizer",
    "ReferenceLogits",
    "judge",
    "judge_available",
    "llama_quantize",
    "llama_windows",
    "open_llama",
    "reference_logits",
]

log = logging.getLogger(__name__)

_HINT = "install the judge extra: pip install -e '.[judge]'"

# ggml type ids of the KV-cache types a judge may ask for (ggml.h: GGML_TYPE_F32 = 0, ...)
KV_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 8}


class JudgeError(AutobitsError):
    """llama.cpp missing, a file llama.cpp cannot load, or windows that do not fit."""


@dataclass(frozen=True)
class JudgeResult:
    """What llama.cpp measured on one file.

    ``ppl``: perplexity over the scored tokens; ``kld`` / ``top1`` / ``ref_ppl``: mean
    KL(reference || file) in nats, argmax agreement and the reference's perplexity (None
    without a reference); ``seconds``: wall time of the evaluation (both models);
    ``eval_seconds``: time spent in the judged model's forward passes only.
    """

    path: str
    ppl: float
    kld: float | None
    top1: float | None
    ref_ppl: float | None
    reference: str | None
    windows: int
    ctx: int
    tokens_scored: int
    flash_attn: bool
    seconds: float
    eval_seconds: float
    kv_type: str = "f16"

    def to_json(self) -> dict:
        return asdict(self)


def judge_available() -> bool:
    """Whether ``llama_cpp`` (llama-cpp-python) can be imported."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or OSError from a broken shared library
        return False
    return True


def open_llama(path: str | os.PathLike, *, ctx: int, flash_attn: bool = False,
               n_threads: int | None = None, kv_type: str = "f16"):
    """A ``llama_cpp.Llama`` over ``path`` for scoring: ``n_ctx = n_batch = ctx``, logits for
    every position, CPU threads from the machine, ``flash_attn`` and the KV-cache type
    (``"f16"``, llama.cpp's default, ``"f32"`` or ``"q8_0"``) as given."""
    if kv_type not in KV_TYPES:
        raise JudgeError(f"KV cache type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
    try:
        import llama_cpp
    except Exception as e:
        raise JudgeError(f"the judge needs llama-cpp-python ({e}); {_HINT}") from None
    p = Path(path)
    if not p.is_file():
        raise JudgeError(f"GGUF file {str(p)!r} does not exist")
    threads = int(n_threads or os.cpu_count() or 1)
    try:
        return llama_cpp.Llama(
            model_path=str(p), n_ctx=int(ctx), n_batch=int(ctx), n_ubatch=int(ctx),
            logits_all=True, flash_attn=bool(flash_attn), n_threads=threads,
            n_threads_batch=threads, n_gpu_layers=0, verbose=False,
            type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type],
        )
    except (ValueError, RuntimeError) as e:
        raise JudgeError(f"llama.cpp could not load {str(p)!r}: {e}") from None


class LlamaTokenizer:
    """llama.cpp's tokenizer of a loaded file, called like a Hugging Face tokenizer
    (``tok(texts, add_special_tokens=False)["input_ids"]``, ``bos_token_id``) so that
    :func:`autobits.text.make_windows` cuts windows of llama.cpp's own token ids.
    Special-token text is not parsed, as in ``llama-perplexity``."""

    def __init__(self, llm) -> None:
        self._llm = llm
        bos = int(llm.token_bos())
        self.bos_token_id = bos if bos >= 0 else None

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False, **_: Any):
        ids = [self._llm.tokenize(t.encode("utf-8"), add_bos=bool(add_special_tokens),
                                  special=False) for t in texts]
        return {"input_ids": ids}


def llama_windows(llm, text: str | os.PathLike | None, *, ctx: int, n: int):
    """The last ``n`` windows of ``ctx`` tokens of ``text`` under ``llm``'s tokenizer.

    Returns the :class:`~autobits.text.WindowSplit` (``.eval`` holds the token ids).
    """
    from autobits.text import load_text, make_windows

    corpus = load_text(text)
    windows = make_windows(corpus, LlamaTokenizer(llm), ctx=ctx)
    return windows.split(calib=0, eval=n)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _scored_logits(llm, tokens: np.ndarray, first: int) -> np.ndarray:
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[first : len(tokens) - 1], dtype=np.float32)


@dataclass(frozen=True, eq=False)
class ReferenceLogits:
    """A reference file's log-probabilities at the scored positions of some windows, kept
    in memory (float32, ``(ctx - 1 - ctx/2, vocab)`` per window) so that many files can be
    compared with one reference pass."""

    path: str
    windows: np.ndarray
    logprobs: tuple[np.ndarray, ...]
    ppl: float
    flash_attn: bool
    seconds: float
    kv_type: str = "f16"


def reference_logits(
    path: str | os.PathLike, *, windows: np.ndarray, flash_attn: bool = False,
    n_threads: int | None = None, kv_type: str = "f16",
) -> ReferenceLogits:
    """Run the reference file once over ``windows`` and keep its scored log-probabilities."""
    tokens = _check_windows(windows)
    n, ctx = tokens.shape
    first = ctx // 2
    t0 = time.perf_counter()
    llm = open_llama(path, ctx=ctx, flash_attn=flash_attn, n_threads=n_threads, kv_type=kv_type)
    _check_ids(llm, tokens, path)
    out, nll = [], 0.0
    for k in range(n):
        lp = _log_softmax(_scored_logits(llm, tokens[k], first))
        nll -= float(lp[np.arange(ctx - 1 - first), tokens[k, first + 1 :]].sum())
        out.append(lp.astype(np.float32))
    ppl = math.exp(nll / (n * (ctx - 1 - first)))
    return ReferenceLogits(str(path), tokens.copy(), tuple(out), ppl, bool(flash_attn),
                           time.perf_counter() - t0, kv_type)


def _check_windows(windows) -> np.ndarray:
    tokens = np.asarray(windows, dtype=np.int64)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < 4:
        raise JudgeError(f"windows must be a non-empty (n, ctx>=4) array, got {tokens.shape}")
    return tokens


def _check_ids(llm, tokens: np.ndarray, path) -> None:
    vocab = llm.n_vocab()
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise JudgeError(
            f"window token ids span {tokens.min()}..{tokens.max()}, the vocabulary of "
            f"{Path(path).name} has {vocab}"
        )


def judge(
    gguf_path: str | os.PathLike,
    *,
    windows: np.ndarray,
    reference: str | os.PathLike | ReferenceLogits | None = None,
    flash_attn: bool = False,
    n_threads: int | None = None,
    llm=None,
    kv_type: str = "f16",
) -> JudgeResult:
    """Perplexity of ``gguf_path`` on ``windows`` in llama.cpp, with KLD and top-1 agreement
    against ``reference`` when given.

    ``windows`` is an int array ``(n, ctx)`` (e.g. from :func:`llama_windows`); the second
    half of each window is scored, like ``llama-perplexity``.  ``reference`` is a GGUF path
    (run window by window next to the judged file) or a :class:`ReferenceLogits` computed
    once on the same windows with the same flash-attention setting.  ``llm`` reuses an
    already opened ``Llama`` of ``gguf_path`` (``n_ctx >= ctx``, ``logits_all``).
    """
    tokens = _check_windows(windows)
    n, ctx = tokens.shape
    first = ctx // 2
    t0 = time.perf_counter()
    model = llm or open_llama(gguf_path, ctx=ctx, flash_attn=flash_attn, n_threads=n_threads,
                              kv_type=kv_type)
    _check_ids(model, tokens, gguf_path)
    ref = ref_path = None
    if isinstance(reference, ReferenceLogits):
        if (not np.array_equal(reference.windows, tokens)
                or reference.flash_attn != bool(flash_attn) or reference.kv_type != kv_type):
            raise JudgeError("reference logits were computed on other windows or with another "
                             "flash-attention or KV-cache setting")
        ref_path = reference.path
        if reference.logprobs[0].shape[1] != model.n_vocab():
            raise JudgeError(f"reference has {reference.logprobs[0].shape[1]} tokens in its "
                             f"vocabulary, {str(gguf_path)!r} has {model.n_vocab()}")
    elif reference is not None:
        ref_path = str(reference)
        ref = open_llama(reference, ctx=ctx, flash_attn=flash_attn, n_threads=n_threads,
                         kv_type=kv_type)
        if ref.n_vocab() != model.n_vocab():
            raise JudgeError(
                f"reference {str(reference)!r} has {ref.n_vocab()} tokens in its vocabulary, "
                f"{str(gguf_path)!r} has {model.n_vocab()}"
            )
    nll = ref_nll = kl = 0.0
    agree = 0
    eval_s = 0.0
    rows = np.arange(ctx - 1 - first)
    for k in range(n):
        t1 = time.perf_counter()
        lp = _log_softmax(_scored_logits(model, tokens[k], first))
        eval_s += time.perf_counter() - t1
        target = tokens[k, first + 1 :]
        nll -= float(lp[rows, target].sum())
        if reference is not None:
            if ref is not None:
                rlp = _log_softmax(_scored_logits(ref, tokens[k], first))
            else:
                rlp = reference.logprobs[k].astype(np.float64)
            ref_nll -= float(rlp[rows, target].sum())
            kl += float((np.exp(rlp) * (rlp - lp)).sum())
            agree += int((rlp.argmax(-1) == lp.argmax(-1)).sum())
        log.debug("window %d/%d done", k + 1, n)
    scored = n * (ctx - 1 - first)
    has_ref = reference is not None
    res = JudgeResult(
        path=str(gguf_path), ppl=math.exp(nll / scored),
        kld=max(kl / scored, 0.0) if has_ref else None,
        top1=agree / scored if has_ref else None,
        ref_ppl=math.exp(ref_nll / scored) if has_ref else None,
        reference=ref_path, windows=n, ctx=ctx, tokens_scored=scored,
        flash_attn=bool(flash_attn), seconds=time.perf_counter() - t0, eval_seconds=eval_s,
        kv_type=kv_type,
    )
    log.info("judge %s: ppl %.4f%s over %d windows x %d (%.1fs)", Path(gguf_path).name, res.ppl,
             f", KLD {res.kld:.6f}, top-1 {res.top1:.4f}" if has_ref else "", n, ctx, res.seconds)
    return res


def _ggml_type_id(lc, name: str) -> int:
    from autobits.formats import get_format

    tid = getattr(get_format(name), "ggml_type", None)
    if tid is None:
        raise JudgeError(f"{name!r} is not a ggml type llama.cpp can write")
    return int(tid)


def llama_quantize(
    src: str | os.PathLike, dst: str | os.PathLike, *, preset: str,
    importance: Mapping[str, np.ndarray] | None = None, n_threads: int = 0,
    tensor_types: Sequence[tuple[str, str]] | None = None,
    token_embedding_type: str | None = None, output_tensor_type: str | None = None,
    allow_requantize: bool = False,
) -> Path:
    """``llama-quantize src dst preset`` through the binding (``llama_model_quantize``).

    ``importance`` (tensor name -> per-input-channel ``E[x^2]``) is handed to llama.cpp in
    memory as ``llama_model_quantize_params.imatrix`` (what ``llama-quantize --imatrix``
    builds from an imatrix file: the mean squared activation per channel), so llama.cpp
    rounds with exactly the vectors autobits uses.  ``tensor_types`` are
    ``(pattern, type)`` overrides as ``--tensor-type`` / ``--tensor-type-file`` parse them
    (pattern lower-cased, a regex searched in each name; type a ggml type name), handed over
    as ``tt_overrides``; ``token_embedding_type`` / ``output_tensor_type`` /
    ``allow_requantize`` are the flags of the same names.  Written to a temporary name, then
    renamed.
    """
    try:
        import llama_cpp.llama_cpp as lc
    except Exception as e:
        raise JudgeError(f"llama_quantize needs llama-cpp-python ({e}); {_HINT}") from None
    key = str(preset).upper()
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{key}", None)
    if ftype is None:
        raise JudgeError(f"llama.cpp has no preset {preset!r}")
    dst = Path(dst)
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(n_threads)
    keep: list = []
    if importance:
        entries = (lc.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, vec) in enumerate(sorted(importance.items())):
            v = np.ascontiguousarray(vec, dtype=np.float32)
            keep.append((name.encode(), v))
            entries[i].name = keep[-1][0]
            entries[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = v.size
        entries[len(importance)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
    if tensor_types:
        if not hasattr(lc, "llama_model_tensor_override"):
            raise JudgeError("this llama-cpp-python has no per-tensor type overrides "
                             "(llama_model_quantize_params.tt_overrides)")
        tto = (lc.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, tname) in enumerate(tensor_types):
            keep.append(str(pattern).lower().encode())
            tto[i].pattern = keep[-1]
            tto[i].type = _ggml_type_id(lc, tname)
        tto[len(tensor_types)].pattern = None
        keep.append(tto)
        params.tt_overrides = ctypes.cast(tto, ctypes.POINTER(lc.llama_model_tensor_override))
    if token_embedding_type is not None:
        params.token_embedding_type = _ggml_type_id(lc, token_embedding_type)
    if output_tensor_type is not None:
        params.output_tensor_type = _ggml_type_id(lc, output_tensor_type)
    params.allow_requantize = bool(allow_requantize)
    with atomic_path(dst, suffix=".partial") as tmp:
        rc = lc.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise JudgeError(f"llama_model_quantize {key} of {str(src)!r} failed (code {rc})")
    return dst
