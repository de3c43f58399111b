"""Tokenise a GGUF source exactly as llama.cpp does.

Held-out numbers are only comparable with ``llama-perplexity`` when the windows hold the
same token ids.  transformers rebuilds a Hugging Face tokenizer from a GGUF's vocabulary,
but not llama.cpp's tokenisation rules, and the two part on ordinary text:

- **byte-level BPE** (``tokenizer.ggml.model = gpt2``): transformers gives every vocabulary
  GPT-2's pre-tokenizer, while llama.cpp picks a list of split expressions by
  ``tokenizer.ggml.pre``.  SmolLM2's ``smollm`` isolates every digit first, so
  ``"integer     1"`` is ``integer|·····|1`` in llama.cpp and ``integer|····|·1`` in
  transformers; on the stdlib text the two token streams part at token 3,956 (231,429
  against 231,582 tokens), and every held-out window after that holds other tokens.
  :func:`match_llama_cpp` replaces the pre-tokenizer with llama.cpp's expressions for the
  ``tokenizer.ggml.pre`` names in :data:`BPE_SPLITS` (applied in order, each splitting the
  pieces of the one before, matches kept as pieces), then the byte-to-unicode map.
- **SentencePiece** (``tokenizer.ggml.model = llama``, e.g. Gemma): llama.cpp first cuts
  the text at its user-defined tokens (longest first; Gemma's runs of 2–31 spaces and
  1–31 newlines are such tokens), then merges, in each remaining piece, the adjacent pair
  of highest score until none is in the vocabulary, falling back to ``<0xXX>`` byte
  tokens.  transformers converts the vocabulary to a BPE with merge ranks and no
  user-defined cut, which splits a 31-space run as 16 + 16.  :class:`SentencePieceTokenizer`
  is a port of that algorithm (``llm_tokenizer_spm_session`` and
  ``tokenizer_st_partition`` in llama.cpp's ``src/llama-vocab.cpp``), reading the
  vocabulary, scores and token types from the GGUF.

Special (control) tokens in the text are not parsed, as in ``llama-perplexity``.  The
result is checked against llama.cpp's own tokenizer in ``tests/test_tokenizer.py``.
"""

from __future__ import annotations

import heapq
import logging
from pathlib import Path
from typing import Any, Sequence

from autobits.errors import ModelLoadError

__all__ = ["BPE_SPLITS", "SentencePieceTokenizer", "match_llama_cpp"]

log = logging.getLogger(__name__)

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: llama.cpp's split expressions per ``tokenizer.ggml.pre`` name (src/llama-vocab.cpp,
#: ``llm_tokenizer_bpe``), applied in order; names llama.cpp maps to the same type share
#: an entry.  ``ignore_merges``: llama.cpp takes a piece that is itself a token whole.
BPE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo"), ((_GPT2,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva"), ((r"\p{N}", _GPT2), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), ((_LLAMA3,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), ((_QWEN2,), False)),
}

#: GGUF ``tokenizer.ggml.token_type`` values (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

#: What llama.cpp writes for a space inside SentencePiece pieces.
_SPM_SPACE = "\u2581"


def match_llama_cpp(tokenizer: Any, path: str | Path, metadata: dict[str, Any]) -> Any:
    """The tokenizer to cut windows of the GGUF at ``path`` with: llama.cpp's rules.

    ``tokenizer`` is what transformers built from the file; ``metadata`` the GGUF key/values
    (scalars; see :func:`autobits.model.read_gguf_header`).  A byte-level BPE gets
    llama.cpp's pre-tokenizer in place (the same object is returned); a SentencePiece
    vocabulary gets a :class:`SentencePieceTokenizer`.  A ``tokenizer.ggml.pre`` or model
    this module does not know keeps transformers' tokenizer, with a warning that windows may
    differ from llama.cpp's.
    """
    kind = metadata.get("tokenizer.ggml.model")
    if kind == "llama":
        return SentencePieceTokenizer.from_gguf(path)
    if kind == "gpt2":
        pre = str(metadata.get("tokenizer.ggml.pre") or "default")
        if pre not in BPE_SPLITS:
            log.warning("%s: pre-tokenizer %r is not ported from llama.cpp; windows may hold "
                        "other tokens than llama-perplexity's", Path(path).name, pre)
            return tokenizer
        _set_bpe_splits(tokenizer, *BPE_SPLITS[pre])
        return tokenizer
    log.warning("%s: tokenizer model %r is not ported from llama.cpp; windows may hold other "
                "tokens than llama-perplexity's", Path(path).name, kind)
    return tokenizer


def _set_bpe_splits(tokenizer: Any, splits: Sequence[str], ignore_merges: bool) -> None:
    from tokenizers import Regex, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(expr), behavior="isolated") for expr in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                    use_regex=False)]
    )
    if ignore_merges:
        backend.model.ignore_merges = True


class SentencePieceTokenizer:
    """llama.cpp's SentencePiece tokenisation of a GGUF vocabulary, called like a Hugging
    Face tokenizer (``tok(texts, add_special_tokens=False)["input_ids"]``,
    ``bos_token_id``, ``len(tok)``, ``decode``)."""

    def __init__(self, *, tokens: Sequence[str], scores: Sequence[float],
                 types: Sequence[int], bos_token_id: int | None, add_bos: bool,
                 add_space_prefix: bool) -> None:
        if not len(tokens) == len(scores) == len(types):
            raise ModelLoadError(
                f"GGUF vocabulary lists differ in length: {len(tokens)=}, {len(scores)=}, "
                f"{len(types)=}"
            )
        self._tokens = list(tokens)
        self._ids = {t: i for i, t in enumerate(tokens)}  # as llama.cpp's token_to_id
        self._scores = [float(s) for s in scores]
        self._bytes = {int(t[3:5], 16): i for i, t in enumerate(tokens)
                       if types[i] == _BYTE and len(t) == 6 and t.startswith("<0x")}
        # cut first, longest (in UTF-8 bytes) first; control/unknown are not parsed
        cut = [i for i, k in enumerate(types) if k == _USER_DEFINED and tokens[i]]
        self._cut = sorted(cut, key=lambda i: (-len(tokens[i].encode("utf-8")), i))
        self.bos_token_id = bos_token_id
        self.add_bos_token = bool(add_bos and bos_token_id is not None)
        self._space_prefix = bool(add_space_prefix)

    @classmethod
    def from_gguf(cls, path: str | Path) -> SentencePieceTokenizer:
        """Read the vocabulary of the GGUF at ``path`` (``tokenizer.ggml.*``)."""
        from autobits.gguf_scan import scan_gguf_header

        arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
        fields = scan_gguf_header(path, arrays=arrays).metadata

        def value(key: str, default: Any = None) -> Any:
            v = fields.get(key)
            return default if v is None else v.tolist() if hasattr(v, "tolist") else v

        tokens = value("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{str(path)!r} has no tokenizer.ggml.tokens; expected a "
                                 f"SentencePiece vocabulary")
        bos = value("tokenizer.ggml.bos_token_id")
        return cls(tokens=tokens, scores=value("tokenizer.ggml.scores", [0.0] * len(tokens)),
                   types=value("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)),
                   bos_token_id=None if bos is None else int(bos),
                   add_bos=bool(value("tokenizer.ggml.add_bos_token", True)),
                   add_space_prefix=bool(value("tokenizer.ggml.add_space_prefix", True)))

    def __len__(self) -> int:
        return len(self._tokens)

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False, **_: Any):
        if isinstance(texts, str):
            texts = [texts]
        bos = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        return {"input_ids": [bos + self.encode(t) for t in texts]}

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        """The text of ``ids`` (byte tokens joined back into UTF-8)."""
        out = bytearray()
        byte_id = {i: b for b, i in self._bytes.items()}
        for i in ids:
            i = int(i)
            if i in byte_id:
                out.append(byte_id[i])
            else:
                out += self._tokens[i].replace(_SPM_SPACE, " ").encode("utf-8")
        return out.decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS (``llama_tokenize(..., add_special=false,
        parse_special=false)``)."""
        out: list[int] = []
        prev_special = True
        for piece in self._partition(text):
            if isinstance(piece, int):
                out.append(piece)
                prev_special = True
                continue
            if self._space_prefix and prev_special:
                piece = " " + piece
            out.extend(self._merge(piece.replace(" ", _SPM_SPACE)))
            prev_special = False
        return out

    def _partition(self, text: str) -> list[str | int]:
        """``text`` cut at every user-defined token's text: raw pieces and token ids."""
        parts: list[str | int] = [text] if text else []
        for tid in self._cut:
            needle = self._tokens[tid]
            nxt: list[str | int] = []
            for part in parts:
                if isinstance(part, int) or needle not in part:
                    nxt.append(part)
                    continue
                pieces = part.split(needle)
                for k, raw in enumerate(pieces):
                    if k:
                        nxt.append(tid)
                    if raw:
                        nxt.append(raw)
            parts = nxt
        return parts

    def _merge(self, text: str) -> list[int]:
        """Highest-score pair first, leftmost among equals, until no pair is a token."""
        ids, scores = self._ids, self._scores
        sym = list(text)
        n = len(sym)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prev = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            tid = ids.get(sym[left] + sym[right])
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right,
                                      len(sym[left]) + len(sym[right])))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = sym[left], sym[right]
            if not a or not b or len(a) + len(b) != size or nxt[left] != right:
                continue
            sym[left], sym[right] = a + b, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out: list[int] = []
        i = 0 if n else -1
        while i >= 0:
            s = sym[i]
            tid = ids.get(s)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._bytes[b] for b in s.encode("utf-8"))
            i = nxt[i]
        return out
