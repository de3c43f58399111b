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
as ``autobits export`` given the same importance vectors.

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

__all__ = ["RecipeError", "BASE_TYPE", "recipe_lines", "recipe_args", "write_recipe", "read_recipe"]

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
