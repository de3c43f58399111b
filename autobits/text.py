"""Real calibration and evaluation text, with no downloads.

Three kinds of source feed :func:`load_text`:

``"stdlib"`` (the default)
    The docstrings of the Python standard library this interpreter ships, collected
    deterministically (see :func:`stdlib_text`): about 0.9 M characters of English technical
    prose with some code, identical on every run of the same Python build.
``"debian-handbook"``
    The English HTML of Debian's ``debian-handbook`` package (about 150 k words), extracted
    with :mod:`html.parser` (see :func:`html_to_text`). Install it with
    ``apt-get install debian-handbook``.
any other string or :class:`os.PathLike`
    A UTF-8 text file. To load a file literally named ``stdlib``, pass ``Path("stdlib")`` or
    ``"./stdlib"``.

:func:`make_windows` tokenises a :class:`Corpus` into non-overlapping windows of exactly
``ctx`` tokens, and :meth:`Windows.split` takes calibration windows from the start and
held-out evaluation windows from the end.

Windows follow llama.cpp's ``llama-perplexity`` exactly. With BOS, the token stream is BOS
followed by the text's tokens, cut into consecutive pieces of ``ctx`` tokens, and the first
token of every piece is then set to BOS: window ``k`` holds BOS and the stream's tokens
``k*ctx+1 .. (k+1)*ctx-1`` (the text token at each later window's first position is
dropped, as llama.cpp drops it), so window ``k`` is llama.cpp's chunk ``k`` on the same text.
Whether windows get BOS follows llama.cpp's rule too: by default, exactly when the tokenizer
itself puts BOS in front of an encoded text (GGUF ``tokenizer.ggml.add_bos_token``; true for
Gemma, false for SmolLM2, whose ``<|im_start|>`` BOS is a chat-turn marker), whatever its
``bos_token_id``; ``make_windows(..., add_bos=True/False)`` overrides it.
"""

from __future__ import annotations

import functools
import hashlib
import html.parser
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from autobits.errors import AutobitsError

__all__ = [
    "HANDBOOK_DIR", "SOURCES", "Corpus", "TextError", "WindowSplit", "Windows", "adds_bos",
    "handbook_text", "html_to_text", "load_text", "make_windows", "stdlib_module_names",
    "stdlib_text", "tokenize",
]

log = logging.getLogger(__name__)

#: Where Debian's ``debian-handbook`` package puts its English HTML.
HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html/en-US")

#: The named sources :func:`load_text` knows; anything else is a file path.
SOURCES = ("stdlib", "debian-handbook")

#: Top-level stdlib modules never imported for :func:`stdlib_text`: import side effects
#: (a browser, printing, GUI toolkits, terminal state, setuptools' distutils shim), the test
#: suite, and modules that exist on one platform only (so the text is the same on Linux and
#: macOS wherever possible).
_STDLIB_SKIP = frozenset(
    # side effects on import, or GUI
    "antigravity this idlelib tkinter turtle turtledemo rlcompleter readline distutils lib2to3 "
    "ensurepip pydoc_data test "
    # Windows only
    "msilib msvcrt nt winreg winsound "
    # POSIX only
    "posix pwd grp termios tty pty fcntl resource syslog nis ossaudiodev spwd crypt curses".split()
)


class TextError(AutobitsError):
    """A text source that cannot be loaded, or windows that cannot be made or split."""



@dataclass(frozen=True)
class Corpus:
    """A loaded text: ``name`` (the source), ``text`` and the SHA-256 of its UTF-8 bytes."""

    name: str
    text: str
    sha256: str

    @classmethod
    def from_text(cls, name: str, text: str) -> Corpus:
        """Build a corpus from text, computing its hash."""
        return cls(name=name, text=text, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())

    def __repr__(self) -> str:
        return f"Corpus(name={self.name!r}, chars={len(self.text)}, sha256={self.sha256[:12]}…)"


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class WindowSplit:
    """Calibration and held-out evaluation windows taken from one :class:`Windows`.

    ``calib`` and ``eval`` are read-only int64 arrays of shape ``(count, ctx)``;
    ``calib_ids``/``eval_ids`` are the indices of those windows in the source
    :class:`Windows` (calibration from the start, evaluation from the end, never shared).
    """

    calib: np.ndarray
    eval: np.ndarray
    calib_ids: tuple[int, ...]
    eval_ids: tuple[int, ...]
    corpus: str = field(kw_only=True)
    sha256: str = field(kw_only=True)
    ctx: int = field(kw_only=True)
    add_bos: bool = field(kw_only=True)
    n_windows: int = field(kw_only=True)

    def to_json(self) -> dict[str, Any]:
        """What is needed to rebuild this split: the text's name and hash, ``ctx``, BOS use,
        how many windows the text gave, and the window indices used."""
        keys = ("corpus", "sha256", "ctx", "add_bos", "n_windows")
        return {k: getattr(self, k) for k in keys} | {
            "calib_ids": list(self.calib_ids), "eval_ids": list(self.eval_ids)
        }


@dataclass(frozen=True, eq=False)
class Windows:
    """A corpus tokenised and cut into ``n`` windows of exactly ``ctx`` tokens.

    ``tokens`` is a read-only int64 array of shape ``(n, ctx)``. With ``add_bos`` every
    window starts with ``bos_token_id`` (llama.cpp's convention, see the module docstring).
    ``text_tokens`` is how many tokens the whole text gave before cutting.
    """

    corpus: str
    sha256: str
    ctx: int
    tokens: np.ndarray
    add_bos: bool = field(default=False, kw_only=True)
    bos_token_id: int | None = field(default=None, kw_only=True)
    text_tokens: int = field(default=0, kw_only=True)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def split(self, *, calib: int, eval: int) -> WindowSplit:  # noqa: A002 (the API's name)
        """The first ``calib`` windows for calibration and the last ``eval`` for evaluation.

        Raises :class:`TextError` for negative counts, or when ``calib + eval`` exceeds the
        windows the text gives (the two sets never overlap).
        """
        for name, value in (("calib", calib), ("eval", eval)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise TextError(f"{name} must be a non-negative window count, got {value!r}")
        calib, eval, n, ctx = int(calib), int(eval), len(self), self.ctx
        if calib + eval > n:
            raise TextError(
                f"corpus {self.corpus!r}: need {calib=} + {eval=} windows of {ctx} tokens, "
                f"the text gives {n}"
            )
        return WindowSplit(
            _readonly(self.tokens[:calib].copy()), _readonly(self.tokens[n - eval :].copy()),
            tuple(range(calib)), tuple(range(n - eval, n)),
            corpus=self.corpus, sha256=self.sha256, ctx=ctx, add_bos=self.add_bos, n_windows=n,
        )


# The collector runs in a fresh interpreter (``python -I -S``: no site-packages, no
# environment variables), so that nothing the calling process imported or patched (torch
# replaces inspect.getfile, transformers adds methods to logging.Logger, pytest swaps
# sys.unraisablehook) can change the text. It prints JSON: the modules read and the text.
_STDLIB_SCRIPT = r"""
import contextlib, importlib, inspect, io, json, sys, warnings

SKIP = set(sys.argv[1].split()) if len(sys.argv) > 1 else set()

def quiet_import(name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                return importlib.import_module(name)
    except Exception:
        return None

def doc(obj):
    try:
        d = inspect.getdoc(obj)
    except Exception:
        return None
    return (d.strip() or None) if isinstance(d, str) else None

def owned(obj, modname):
    # defined in the module, a submodule, or its C accelerator (_io for io, _heapq for heapq)
    mod = getattr(obj, "__module__", None) or "?"
    return mod.startswith(modname + ".") or mod.split(".")[0].lstrip("_") == modname

def module_docs(mod):
    docs = [doc(mod)]
    names = getattr(mod, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = list(vars(mod))
    for name in sorted({str(n) for n in names}):
        if name.startswith("_"):
            continue
        # sys.excepthook & co. are read from their saved originals (sys.__excepthook__);
        # an object must carry its own name (aliases and platform variants are left out)
        obj = vars(mod).get("__%s__" % name)
        if not inspect.isroutine(obj):
            obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__name__", None) != name or not owned(obj, mod.__name__):
            continue
        docs.append(doc(obj))
        if inspect.isclass(obj):
            for attr, raw in sorted(vars(obj).items()):
                raw = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
                if attr[0] != "_" and (inspect.isroutine(raw) or isinstance(raw, (property, type))):
                    docs.append(doc(raw))
    return [d for d in docs if d]

def collect():
    names = sorted(n for n in sys.stdlib_module_names if n[0] != "_" and n not in SKIP)
    modules, seen, parts = [], set(), []
    for name in names:
        mod = quiet_import(name)
        if mod is None:
            continue
        modules.append(name)
        for d in module_docs(mod):
            if d not in seen:
                seen.add(d)
                parts.append(d)
    return {"modules": modules, "docstrings": len(parts), "text": "\n\n".join(parts)}

sys.stdout.buffer.write(json.dumps(collect()).encode("ascii"))
"""


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[tuple[str, ...], str]:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-I", "-S", "-c", _STDLIB_SCRIPT, " ".join(sorted(_STDLIB_SKIP))]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=600, check=True)
        out = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise TextError(
            f"could not collect the standard library's docstrings with {sys.executable!r}: "
            f"{exc} {detail.decode('utf-8', 'replace')[-500:]}".strip()
        ) from None
    text = out["text"]
    log.debug(
        "stdlib text: %d modules, %d docstrings, %d characters in %.2f s",
        len(out["modules"]), out["docstrings"], len(text), time.perf_counter() - t0,
    )
    return tuple(out["modules"]), text


def stdlib_module_names() -> tuple[str, ...]:
    """The sorted public top-level stdlib modules :func:`stdlib_text` reads: those of
    :data:`sys.stdlib_module_names` less private names, the skip list (import side effects,
    platform-specific modules) and modules that fail to import here."""
    return _stdlib_docs()[0]


def stdlib_text() -> str:
    """The docstrings of the Python standard library, joined by blank lines.

    For each module of :func:`stdlib_module_names` in order: the module's docstring, then for
    each public name (sorted; ``__all__`` when the module defines it) that is a class or
    function of that module, its docstring (:func:`inspect.getdoc`) followed by those of the
    class's own public methods, properties and nested classes (sorted). Each distinct
    docstring is kept once, at its first place. The text is collected in a fresh isolated
    interpreter (``sys.executable -I -S``), so neither import order, hash seed nor what the
    calling process imported or patched can change it: it is identical across runs of the
    same Python. About 0.9 M characters on CPython 3.11.
    """
    return _stdlib_docs()[1]


_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_SKIP_TAGS = frozenset(
    "pre script style head nav noscript template svg button form select textarea iframe "
    "object".split()
)
_SKIP_CLASSES = frozenset(
    "docnav toc navheader navfooter breadcrumbs list-of-figures list-of-tables "
    "list-of-examples list-of-procedures".split()
)
_SKIP_IDS = frozenset("banner title navigation nav header footer sidebar-nav".split())
_BLOCK = frozenset(
    "p div h1 h2 h3 h4 h5 h6 li dt dd dl ul ol blockquote table tr thead tbody tfoot caption "
    "section article aside header footer figure figcaption main body html title hr br address "
    "details summary".split()
)
_CELL = frozenset({"td", "th"})
_WS = re.compile(r"\s+")


class _TextExtractor(html.parser.HTMLParser):
    """Collects the readable paragraphs of an HTML page (see :func:`html_to_text`)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.next_href: str | None = None
        self._buf: list[str] = []
        self._skip_tag: str | None = None
        self._skip_depth = 0

    def _flush(self) -> None:
        para = _WS.sub(" ", "".join(self._buf)).strip()
        self._buf.clear()
        if para:
            self.paragraphs.append(para)

    @staticmethod
    def _skipped(tag: str, attrs: dict[str, str | None]) -> bool:
        classes = (attrs.get("class") or "").split()
        skipped_class = any(c in _SKIP_CLASSES for c in classes)
        return tag in _SKIP_TAGS or attrs.get("id") in _SKIP_IDS or skipped_class

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "link" and "next" in (a.get("rel") or "").split() and self.next_href is None:
            self.next_href = a.get("href")
        if self._skip_tag is not None:
            if tag == self._skip_tag and tag not in _VOID:
                self._skip_depth += 1
            return
        if tag not in _VOID and self._skipped(tag, a):
            self._flush()
            self._skip_tag, self._skip_depth = tag, 1
            return
        if tag in _BLOCK:
            self._flush()
        elif tag in _CELL:
            self._buf.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tag is not None:
            if tag == self._skip_tag:
                self._skip_depth -= 1
                if self._skip_depth == 0:
                    self._skip_tag = None
            return
        if tag in _BLOCK:
            self._flush()
        elif tag in _CELL:
            self._buf.append(" ")

    def handle_data(self, data: str) -> None:
        if self._skip_tag is None:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _parse_html(markup: str) -> _TextExtractor:
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    return parser


def html_to_text(markup: str) -> str:
    """The readable text of an HTML page, one paragraph per block, joined by blank lines.

    Inline markup (``<code>``, ``<em>``, links…) keeps its text in the running paragraph;
    ``<pre>`` blocks, scripts, styles, ``<head>`` and navigation (``<nav>``, Publican's
    ``docnav``/``toc`` lists, the banner) are dropped; whitespace collapses to one space."""
    return "\n\n".join(_parse_html(markup).paragraphs)


def _handbook_pages(directory: Path) -> list[str]:
    """The text of each of the handbook's pages in reading order: the ``rel=next`` chain from
    ``index.html``, then any page the chain missed, sorted by name."""
    pages = {p.name: p for p in directory.glob("*.html") if p.is_file()}
    parsed: dict[str, _TextExtractor] = {}

    def parse(name: str) -> _TextExtractor:
        if name not in parsed:
            parsed[name] = _parse_html(pages[name].read_text(encoding="utf-8"))
        return parsed[name]

    order: list[str] = []
    name: str | None = "index.html"
    while name is not None and name in pages and name not in parsed:
        order.append(name)
        nxt = parse(name).next_href
        name = nxt.split("#")[0] if nxt else None
    order += [n for n in sorted(pages) if n not in parsed]
    return ["\n\n".join(parse(n).paragraphs) for n in order]


@functools.lru_cache(maxsize=4)
def handbook_text(directory: str | os.PathLike[str] = HANDBOOK_DIR) -> str:
    """The text of the Debian Administrator's Handbook (package ``debian-handbook``), its
    pages in reading order, extracted with :func:`html_to_text`. Raises :class:`TextError`
    with the install command when the package's HTML is not there."""
    directory = Path(directory)
    if not directory.is_dir() or not any(directory.glob("*.html")):
        raise TextError(
            f"the debian-handbook text is not installed (no HTML pages in {directory}); "
            "install it with: apt-get update && apt-get install -y debian-handbook"
        )
    t0 = time.perf_counter()
    pages = _handbook_pages(directory)
    text = "\n\n".join(t for t in pages if t)
    log.debug(
        "debian-handbook text: %d pages, %d characters in %.2f s",
        len(pages), len(text), time.perf_counter() - t0,
    )
    return text


def _file_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines: \r\n becomes \n
            text = f.read()
    except FileNotFoundError:
        raise TextError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise TextError(f"text path is a directory, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        where = f"{exc.reason} at byte {exc.start}"
        raise TextError(f"text file is not valid UTF-8: {path} ({where})") from None
    except OSError as exc:
        raise TextError(f"cannot read text file {path}: {exc.strerror or exc}") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise TextError(f"text file is empty: {path}")
    return text


def load_text(source: str | os.PathLike[str] | None = None) -> Corpus:
    """Load a text corpus.

    ``source`` is ``None`` or ``"stdlib"`` (the Python standard library's docstrings),
    ``"debian-handbook"``, or the path of a UTF-8 text file (a string or path object; a
    path object is always taken as a path). Raises :class:`TextError` naming the path when
    a file is missing, unreadable, not UTF-8 or empty, and saying how to install the
    handbook when it is missing.
    """
    if source is None or (isinstance(source, str) and source == "stdlib"):
        corpus = Corpus.from_text("stdlib", stdlib_text())
    elif isinstance(source, str) and source == "debian-handbook":
        corpus = Corpus.from_text("debian-handbook", handbook_text())
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        corpus = Corpus.from_text(path.name or str(path), _file_text(path))
    else:
        raise TextError(
            f"text source must be {' or '.join(map(repr, SOURCES))} or a file path, got {source!r}"
        )
    log.debug("loaded text %r: %d characters, sha256 %.12s", corpus.name, len(corpus.text),
             corpus.sha256)
    return corpus


_CHUNK_CHARS = 4000
_BATCH = 256
# A cut point: the start of a paragraph that follows a blank line.
_PARA_START = re.compile(r"\n[ \t]*\n(?=\S)")
_PROBES = (
    "First paragraph, with words.\n\nSecond paragraph",
    "a line\nanother line.\n\n\nThird (after two blank lines)",
    "ends with code `x = 1`\n\n`y` begins here",
    "Numbers 12345\n\n67890 and more",
    "Fin.\n\nÉté — naïve 日本語\n\n# heading",
)


def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """``input_ids`` of each text, without special tokens (HF tokenizer call convention)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), _BATCH):
        batch = list(texts[i : i + _BATCH])
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        out.extend([int(t) for t in seq] for seq in ids)
    return out


def _stable_cut(tokenizer: Any, probe: str, offset: int) -> bool:
    """Whether cutting ``probe`` at its paragraph starts (less ``offset``) keeps its tokens."""
    bounds = [0, *(m.end() - offset for m in _PARA_START.finditer(probe)), len(probe)]
    whole, *pieces = _encode(tokenizer, [probe] + [probe[a:b] for a, b in zip(bounds, bounds[1:])])
    return whole == [t for piece in pieces for t in piece]


def _cut_offset(tokenizer: Any) -> int | None:
    """Where to cut text at a paragraph start so that the pieces tokenise to exactly the
    tokens of the whole: ``0`` = at the paragraph's first character, ``1`` = one character
    earlier (before the last newline), ``None`` = neither works for this tokenizer."""
    ok = (o for o in (1, 0) if all(_stable_cut(tokenizer, p, o) for p in _PROBES))
    return next(ok, None)


def _chunks(text: str, offset: int, max_chars: int = _CHUNK_CHARS) -> list[str]:
    """Consecutive pieces of ``text`` (their concatenation is ``text``) of about
    ``max_chars`` characters, cut only at paragraph starts (shifted back by ``offset``)."""
    chunks: list[str] = []
    start = prev = 0
    for cut in [m.end() - offset for m in _PARA_START.finditer(text)] + [len(text)]:
        if cut - start > max_chars and prev > start:
            chunks.append(text[start:prev])
            start = prev
        prev = cut
    return chunks + [text[start:]] if start < len(text) else chunks


def tokenize(text: str, tokenizer: Any) -> list[int]:
    """The token ids of ``text`` (no special tokens), tokenised in chunks of paragraphs.

    The chunks are cut where this tokenizer gives exactly the tokens of the whole text
    (checked on probe strings); a tokenizer for which no such cut exists (e.g. one adding a
    prefix space to every input) gets the whole text in one call instead.
    """
    offset = _cut_offset(tokenizer)
    if offset is None:
        log.debug("tokenizer is not stable at paragraph cuts; tokenising the text in one piece")
    pieces = [text] if offset is None else _chunks(text, offset)
    return [t for seq in _encode(tokenizer, pieces) for t in seq]


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token in front of an encoded text, as llama.cpp's
    ``llama_vocab_get_add_bos`` tells for a GGUF: found by encoding a probe with special
    tokens; a tokenizer that cannot be asked so falls back to its ``add_bos_token``
    attribute, then to having a ``bos_token_id`` at all."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer(["a"], add_special_tokens=True)["input_ids"][0]
        return len(ids) > 0 and int(ids[0]) == int(bos)
    except Exception:  # a tokenizer that only takes the calls make_windows needs
        flag = getattr(tokenizer, "add_bos_token", None)
        return flag if isinstance(flag, bool) else True


def make_windows(
    corpus: Corpus, tokenizer: Any, *, ctx: int, add_bos: bool | None = None
) -> Windows:
    """Tokenise ``corpus`` and cut it into non-overlapping windows of exactly ``ctx`` tokens.

    ``tokenizer`` is a Hugging Face tokenizer (anything called as
    ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` with a ``bos_token_id``).
    ``add_bos`` defaults to whether the tokenizer itself adds BOS (:func:`adds_bos`); with
    it, every window's first token is BOS, placed as llama.cpp's perplexity tool places it
    (see the module docstring). A trailing partial window is dropped. Raises :class:`TextError` for
    ``ctx < 2`` or ``add_bos=True`` with a tokenizer that has no BOS token.
    """
    if isinstance(ctx, bool) or not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise TextError(f"ctx must be an integer >= 2 tokens, got {ctx!r}")
    ctx = int(ctx)
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        add_bos = adds_bos(tokenizer)
    if add_bos and bos is None:
        raise TextError("add_bos=True but the tokenizer has no BOS token (bos_token_id is None)")
    t0 = time.perf_counter()
    ids = tokenize(corpus.text, tokenizer)
    seconds = time.perf_counter() - t0
    stream = np.asarray(([int(bos)] if add_bos else []) + ids, dtype=np.int64)
    n = len(stream) // ctx
    tokens = stream[: n * ctx].reshape(n, ctx).copy()
    if add_bos and n:
        tokens[:, 0] = int(bos)
    log.debug(
        "tokenised %r: %d characters -> %d tokens in %.2f s; %d windows of %d tokens%s",
        corpus.name, len(corpus.text), len(ids), seconds, n, ctx, " (BOS first)" if add_bos else "",
    )
    if n == 0:
        log.debug("text %r gives no window of %d tokens (%d)", corpus.name, ctx, len(stream))
    return Windows(
        corpus.name, corpus.sha256, ctx, _readonly(tokens), add_bos=bool(add_bos),
        bos_token_id=None if bos is None else int(bos), text_tokens=len(ids),
    )
