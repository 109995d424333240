"""A tiny Hugging Face Llama built from a config (no download): ``--model examples.hf_llama:build``."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM


def build(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          tie: bool = True, seq_len: int = 256) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=seq_len, tie_word_embeddings=tie, attn_implementation="sdpa")
    return LlamaForCausalLM(config)
