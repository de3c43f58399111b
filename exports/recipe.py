"""An allocation as a recipe for llama.cpp's own quantizer (``llama-quantize``).

For models too large for autobits' pipeline, or for users who want llama.cpp to write the
file, :func:`write_recipe` hands the allocation over in the form ``llama-quantize`` reads
(``tools/quantize/quantize.cpp``):

* ``FILE`` for ``--tensor-type-file``: one ``pattern=type`` token per line.  llama.cpp splits
  the file on whitespace (no comments), lower-cases the pattern and matches it with
  ``std::regex_search`` against each tensor name; the type is a ggml type name, compared
  without case.  Each line is therefore the tensor's exact, anchored and escaped name
  (``^blk\\.0\\.attn_q\\.weight$=q4_k``): one line matches one tensor, whether llama.cpp lets
  the first (newer) or the last (older) matching pattern win.
* ``FILE.args``: the other ``llama-quantize`` flags the recipe needs, on one line:
  ``--token-embedding-type`` / ``--output-tensor-type`` (the embedding and head types, which
  llama.cpp applies before or after the patterns depending on its version),
  ``--allow-requantize`` when the model's source is already quantized, and
  ``--tensor-type-file FILE``.  The base type to pass is :data:`BASE_TYPE` (``Q8_0``): every
  quantizable tensor has its own line, and a base with 32-value blocks never needs a shape
  fallback in llama.cpp's default rules (older llama.cpp skipped the override of a tensor
  whose default type had fallen back).

Then ``llama-quantize $(cat FILE.args) [--imatrix IMATRIX] SOURCE.gguf OUT.gguf Q8_0`` from a
float GGUF of the same weights writes every tensor in its allocated type, with the same bytes
as ``autobits export`` given the same importance vectors.  :func:`apply_recipe` does that
through llama-cpp-python's binding of the same quantizer (the ``judge`` extra) and checks
that every tensor of the written file has its allocated type.

A format llama.cpp would silently replace is never written: every type must be a ggml type
(packed ``INT*`` formats are autobits' own) whose block fits the tensor's rows (llama.cpp's
``tensor_type_fallback`` would otherwise quietly pick another), else :class:`RecipeError`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

from autobits.allocation import FLOAT_KEPT, Allocation
from autobits.errors import AutobitsError
from autobits.formats import get_format
from autobits.io import write_atomic
from autobits.requantize import is_quantized_source

__all__ = ["RecipeError", "BASE_TYPE", "recipe_lines", "recipe_args", "write_recipe", "read_recipe",
           "apply_recipe"]

log = logging.getLogger(__name__)

#: The type argument to pass to ``llama-quantize`` with a recipe.
BASE_TYPE = "Q8_0"
_SAFE_NAME = re.compile(r"^[a-z0-9_.\-]+$")
_TOKEN_EMBD = "token_embd.weight"
_OUTPUT = "output.weight"


class RecipeError(AutobitsError):
    """An allocation that llama-quantize could not reproduce exactly."""


def _llama_quantizes(spec) -> bool:
    """Whether llama.cpp's quantizer would choose a type for this tensor (2-D+ ``*weight``,
    not a norm): those tensors need a line even when autobits keeps them in F32."""
    return (len(spec.shape) >= 2 and spec.name.endswith("weight")
            and "_norm.weight" not in spec.name)


def _type_for(spec, fmt_name: str) -> str:
    fmt = get_format(fmt_name)
    if getattr(fmt, "ggml_type", None) is None:
        raise RecipeError(f"tensor {spec.name!r} is allocated {fmt.name}, which is not a ggml "
                          f"type: llama-quantize cannot write it")
    row = int(spec.shape[-1])
    if not fmt.fits(row):
        raise RecipeError(f"tensor {spec.name!r} has rows of {row} values, which {fmt.name} "
                          f"blocks of {fmt.block_size} do not divide: llama-quantize would "
                          f"fall back to another type")
    if not _SAFE_NAME.match(spec.name):
        raise RecipeError(f"tensor name {spec.name!r} cannot be a llama-quantize pattern "
                          f"(it lower-cases patterns and splits the file on whitespace)")
    return fmt.name.lower()


def recipe_lines(allocation: Allocation, specs: Sequence) -> list[str]:
    """``^name$=type`` for every tensor llama.cpp would quantize, in the model's order."""
    lines = []
    for s in specs:
        if s.name in allocation.tensors:
            fmt = allocation.tensors[s.name]
        elif _llama_quantizes(s):
            fmt = FLOAT_KEPT
        else:
            continue
        lines.append(f"^{re.escape(s.name)}$={_type_for(s, fmt)}")
    return lines


def recipe_args(allocation: Allocation, specs: Sequence, recipe_path: str | os.PathLike) -> list[str]:
    """The ``llama-quantize`` flags that go with the recipe at ``recipe_path``."""
    by_name = {s.name: s for s in specs}
    args = []
    for name, flag in ((_TOKEN_EMBD, "--token-embedding-type"), (_OUTPUT, "--output-tensor-type")):
        if name in allocation.tensors:
            args += [flag, _type_for(by_name[name], allocation.tensors[name])]
    if is_quantized_source(specs):
        args.append("--allow-requantize")
    args += ["--tensor-type-file", str(recipe_path)]
    return args


def write_recipe(allocation: Allocation, specs: Sequence, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the recipe to ``path`` and its flags to ``path.args`` (atomically); return both."""
    path = Path(path)
    lines = recipe_lines(allocation, specs)
    args = recipe_args(allocation, specs, path)
    args_path = path.with_name(path.name + ".args")
    write_atomic(path, "\n".join(lines) + "\n")
    write_atomic(args_path, " ".join(args) + "\n")
    log.info("recipe for llama-quantize: %s (%d tensors), flags in %s", path, len(lines), args_path)
    return path, args_path


def read_recipe(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A ``--tensor-type-file`` as ``llama-quantize`` parses it: whitespace-separated
    ``pattern=type`` tokens, the pattern lower-cased, split at the first ``=``."""
    out = []
    for token in Path(path).read_text(encoding="utf-8").split():
        pattern, sep, tname = token.partition("=")
        if not sep or not pattern or not tname:
            raise RecipeError(f"recipe {str(path)!r}: malformed entry {token!r} (expected "
                              f"pattern=type)")
        out.append((pattern.lower(), tname))
    return out


#: ``FILE.args`` flags that take a value, and the keyword of :func:`llama_quantize` each is.
_VALUE_FLAGS = {"--token-embedding-type": "token_embedding_type",
                "--output-tensor-type": "output_tensor_type", "--tensor-type-file": None}


def _read_args(path: Path) -> dict:
    """``FILE.args`` as :func:`~autobits.exports.judge.llama_quantize` keywords (and the
    recipe file under ``None``)."""
    tokens = path.read_text(encoding="utf-8").split()
    out: dict = {}
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if flag == "--allow-requantize":
            out["allow_requantize"] = True
            i += 1
        elif flag in _VALUE_FLAGS and i + 1 < len(tokens):
            out[_VALUE_FLAGS[flag]] = tokens[i + 1]
            i += 2
        else:
            raise RecipeError(f"recipe flags {str(path)!r}: unexpected {flag!r}")
    return out


def apply_recipe(source: str | os.PathLike, dst: str | os.PathLike, recipe: str | os.PathLike, *,
                 allocation: Allocation | None = None, importance=None) -> Path:
    """``llama-quantize $(cat RECIPE.args) SOURCE DST Q8_0`` through llama-cpp-python (the
    ``judge`` extra), with ``importance`` (tensor -> mean squared input, what
    ``llama-quantize --imatrix`` hands its quantizer) when given; written atomically.  With
    ``allocation``, every allocated tensor of the written file must have its allocated type
    (a :class:`RecipeError` otherwise)."""
    from autobits.exports.judge import llama_quantize

    recipe = Path(recipe)
    kw = _read_args(recipe.with_name(recipe.name + ".args"))
    types = read_recipe(kw.pop(None, recipe))
    out = llama_quantize(source, dst, preset=BASE_TYPE, importance=importance,
                         tensor_types=types, **kw)
    if allocation is not None:
        _check_types(out, allocation)
    return Path(out)


def _check_types(path: Path, allocation: Allocation) -> None:
    import gguf

    from autobits.gguf_scan import scan_gguf_header

    written = {t.name: gguf.GGMLQuantizationType(t.ggml_type).name
               for t in scan_gguf_header(path).tensors}
    for name, fmt in allocation.tensors.items():
        if written.get(name) != fmt:
            raise RecipeError(f"llama.cpp wrote {name!r} as {written.get(name)}, the allocation "
                              f"says {fmt} ({str(path)!r})")
