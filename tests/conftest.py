"""Shared fixtures: a tiny llama model built from a config, and the real SmolLM2 package model."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
