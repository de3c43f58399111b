"""Mapping between Hugging Face parameter names and GGUF tensor names.

One table per supported architecture family; llama.cpp's converter writes the GGUF names
(``convert_hf_to_gguf.py``), transformers reads them back (``modeling_gguf_pytorch_utils``).
"""

from __future__ import annotations

import re

__all__ = ["SUPPORTED_ARCHITECTURES", "hf_to_gguf_name"]

#: GGUF ``general.architecture`` values (and HF ``model_type`` values) we load.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "gemma3")

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_COMMON_BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
}

_BLOCK = {
    "llama": {**_COMMON_BLOCK, "post_attention_layernorm.weight": "ffn_norm.weight"},
    "qwen2": {**_COMMON_BLOCK, "post_attention_layernorm.weight": "ffn_norm.weight"},
    "gemma3": {
        **_COMMON_BLOCK,
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    },
}

_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def hf_to_gguf_name(arch: str, hf_name: str) -> str | None:
    """GGUF name of a Hugging Face parameter, or None if it has no GGUF counterpart."""
    name = hf_name.removeprefix("model.language_model.").removeprefix("language_model.")
    if not name.startswith(("model.", "lm_head")):
        name = "model." + name
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER.match(name.removeprefix("model."))
    if m is None:
        return None
    tail = _BLOCK[arch].get(m.group(2))
    return None if tail is None else f"blk.{m.group(1)}.{tail}"
