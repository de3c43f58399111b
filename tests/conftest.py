"""Shared fixtures (a tiny llama model built from a config, the real SmolLM2 package model)
and the one mechanism for tests that need an optional dependency.

``@pytest.mark.needs("llama_cpp" | "triton" | "oracle" | "qwen")`` marks a test that needs
llama-cpp-python, Triton, llama.cpp's C quantizer (:mod:`autobits.formats.oracle`), or the
22 packages of the ``qwen`` extra. Without the dependency the test is skipped -- except under
``CI=true`` (also ``1``/``yes``), where it fails: a CI run cannot be green because the tests
that matter did not run. The exception is :data:`NOT_IN_CI` (``qwen``: 1.1 GB that CI does
not install), skipped under CI too. The marked test imports the dependency itself (lazily),
never at module level.
"""

from __future__ import annotations

import functools
import importlib
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: Under CI a missing dependency of a ``needs`` test is a failure, not a skip.
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
#: What ``needs`` knows: the module to import, or ``oracle`` (llama.cpp's C quantizer).
DEPENDENCIES = {
    "llama_cpp": "llama-cpp-python (the 'judge' extra: pip install -e '.[judge]')",
    "triton": "Triton (the 'triton' extra: pip install -e '.[triton]')",
    "oracle": "llama.cpp's C quantizer from llama-cpp-python (the 'judge' extra)",
    "qwen": "the Qwen2.5-Coder-1.5B packages (the 'qwen' extra: pip install -e '.[qwen]')",
    "native": "autobits' C extensions (autobits/formats/_kscales_native.c and "
              "autobits/_standin_native.c, built by pip install; need a C compiler)",
}
#: Dependencies that CI does not install on purpose (too large): skipped under CI as well.
NOT_IN_CI = {"qwen"}


@functools.lru_cache(maxsize=None)
def missing(dep: str) -> str | None:
    """Why ``dep`` is unavailable, or None when it is available."""
    if dep not in DEPENDENCIES:
        raise ValueError(f"needs({dep!r}): unknown dependency, expected one of {sorted(DEPENDENCIES)}")
    if dep == "oracle":
        from autobits.formats.oracle import oracle_unavailable_reason

        why = oracle_unavailable_reason()
    elif dep == "native":
        try:
            for module in ("autobits.formats._kscales_native", "autobits._standin_native"):
                importlib.import_module(module)
            why = None
        except ImportError as e:
            why = f"an extension cannot be imported ({e})"
    elif dep == "qwen":
        from autobits.errors import ModelLoadError
        from autobits.registry import _QWEN_PARTS, _record_piece

        why = None
        try:
            for dist, relpath in _QWEN_PARTS:
                _record_piece(dist, relpath)
        except ModelLoadError as e:  # not installed, or another version
            why = str(e)
    else:
        try:
            importlib.import_module(dep)
            why = None
        except ImportError as e:
            why = f"{dep} cannot be imported ({e})"
    return None if why is None else f"{DEPENDENCIES[dep]} is missing: {why}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs(*deps): the test needs llama_cpp, triton, oracle, native or qwen; skipped "
                   "without them, failed under CI=true (qwen: skipped there too)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        for dep in mark.args:
            why = missing(dep)
            if why is not None:
                if IN_CI and dep not in NOT_IN_CI:
                    pytest.fail(f"CI=true: {why}", pytrace=False)
                pytest.skip(why)


@pytest.fixture(scope="session")
def smol_path():
    from autobits.registry import resolve_model_path

    return resolve_model_path("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(
        smol_path.parent, gguf_file=smol_path.name, local_files_only=True
    )


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    """A 2-block llama (hidden 64, MLP 256) saved as a Hugging Face folder, random weights.

    ffn_down's rows (256) fit the K-quants; every other row (64) fits only 32-blocks.
    """
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_folder):
    from autobits.model import load_model

    return load_model(tiny_folder)


@pytest.fixture(scope="session")
def smollm2():
    from autobits.model import load_model

    return load_model("smollm2-135m")
