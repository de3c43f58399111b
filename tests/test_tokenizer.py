"""GGUF sources are tokenised as llama.cpp tokenises them (autobits/tokenizer.py)."""

from __future__ import annotations

import pytest

from autobits.errors import ModelLoadError
from autobits.text import load_text, tokenize
from autobits.tokenizer import BPE_SPLITS, SentencePieceTokenizer

#: Where transformers' GGUF tokenizers and llama.cpp's parted before the port: digits after
#: a run of spaces (SmolLM2's ``smollm`` pre-tokenizer), blank lines before a digit, and
#: Gemma's user-defined runs of spaces and newlines.
_HARD = (
    "    'b'         signed integer     1\n    'B'         unsigned integer   255\n\n"
    "1. Why This Book?\n\n2.3 Numbers 12345 and 2026-12-03\n"
    + " " * 31 + "'ore\\ntree'\n\n\n\n\tTabs\t\tand    spaces   \n"
    "Été — naïve 日本語, emoji 🙂 and ʻokina\n"
)


def _spm(**kw) -> SentencePieceTokenizer:
    toks = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "aa", "\u2581", "\u2581a",
            "  ", "   ", "<0xC3>", "<0xA9>"]
    types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4, 6, 6]
    scores = {"ab": -1.0, "bc": -0.5, "aa": -3.0, "\u2581a": -0.1}
    args = dict(tokens=toks, scores=[scores.get(t, -10.0) for t in toks], types=types,
                bos_token_id=1, add_bos=True, add_space_prefix=False)
    args.update(kw)
    return SentencePieceTokenizer(**args)


def test_sentencepiece_merges_the_highest_scoring_pair_first():
    tok = _spm()
    assert tok.encode("abc") == [3, 7]  # bc (-0.5) before ab (-1.0)
    hi_ab = _spm(scores=[-10, -10, -10, -10, -10, -10, -0.2, -0.5, -3, -10, -0.1, -10, -10,
                         -10, -10])
    assert hi_ab.encode("abc") == [6, 5]


def test_sentencepiece_ties_merge_the_leftmost_pair():
    assert _spm().encode("aaa") == [8, 3]


def test_user_defined_tokens_cut_first_longest_first():
    tok = _spm()
    # "   " and "  " are user-defined: the 3-space run is one token, never ▁ + "  "
    assert tok.encode("a   b") == [3, 12, 4]
    assert tok.encode("a  b") == [3, 11, 4]
    assert tok.encode("a b") == [3, 9, 4]  # a single space is ▁, then merges


def test_unknown_characters_fall_back_to_byte_tokens():
    assert _spm().encode("é") == [13, 14]
    assert _spm().decode([3, 13, 14, 9, 4]) == "aé b"


def test_space_prefix_bos_and_call_convention():
    tok = _spm(add_space_prefix=True)
    assert tok.encode("a") == [10]  # "▁a"
    out = tok(["a", "ab"], add_special_tokens=True)["input_ids"]
    assert out == [[1, 10], [1, 10, 4]]  # ▁a (-0.1) wins over ab (-1.0)
    assert len(tok) == 15 and tok.bos_token_id == 1
    assert _spm(add_bos=False)(["a"], add_special_tokens=True)["input_ids"] == [[3]]


def test_unequal_vocabulary_lists_are_refused():
    with pytest.raises(ModelLoadError, match="len\\(tokens\\)=15, len\\(scores\\)=2"):
        _spm(scores=[0.0, 0.0])


def test_every_ported_pretokenizer_compiles():
    from tokenizers import Regex

    for name, (splits, _) in BPE_SPLITS.items():
        for expr in splits:
            Regex(expr)  # raises on an expression the tokenizers library cannot run


def _llama_ids(path, text: str) -> list[int]:
    import llama_cpp

    from autobits.exports.judge import LlamaTokenizer

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return tokenize(text, LlamaTokenizer(llm))


@pytest.mark.judge
@pytest.mark.needs("llama_cpp")
def test_smollm2_windows_hold_llama_cpp_tokens(smollm2):
    text = _HARD + load_text("stdlib").text[:200_000]
    ours = tokenize(text, smollm2.tokenizer)
    theirs = _llama_ids(smollm2.path, text)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert (len(ours), first) == (len(theirs), None)


@pytest.mark.judge
@pytest.mark.needs("llama_cpp")
def test_gemma_sentencepiece_port_matches_llama_cpp():
    from autobits.registry import resolve_model_path

    path = resolve_model_path("gemma3-270m")
    text = _HARD + load_text("stdlib").text[:300_000]
    ours = tokenize(text, SentencePieceTokenizer.from_gguf(path))
    theirs = _llama_ids(path, text)
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    assert (len(ours), first) == (len(theirs), None)
