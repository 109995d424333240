"""The Hugging Face Llama of ``bench/bench_llama.py``, built from a config (random init, no download): TinyLlama's
shape (1.10B parameters) on the GPU host, a tiny one for the CPU smoke test. A model factory for ``regrow train
--model bench.llama_model:tinyllama``."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
             "num_attention_heads": 32, "num_key_value_heads": 4, "tie_word_embeddings": False}
"""TinyLlama-1.1B's shape."""
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": False}
"""The CPU smoke test's shape."""


def tinyllama(size: str = "1.1b", seq_len: int = 2048, attn: str = "sdpa") -> LlamaForCausalLM:
    """A randomly initialised Llama of TinyLlama's shape (``size="1.1b"``) or a tiny one (``size="tiny"``)."""
    shape = {"1.1b": TINYLLAMA, "tiny": TINY}[size]
    return LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=seq_len, attn_implementation=attn))
