"""A Hugging Face ``LlamaForCausalLM`` built from a ``LlamaConfig`` (random init, nothing downloaded), as a model
factory for regrow::

    regrow train --model examples.hf_llama:build --model-kwargs '{"hidden_size": 128}' --loss hf --steps 50

(from the repository root: the factory's module is found from the working directory). The defaults are a test-sized
model (about 140k parameters); a TinyLlama-shaped 1.1B model is ``{"vocab_size": 32000, "hidden_size": 2048,
"intermediate_size": 5632, "layers": 22, "heads": 32, "kv_heads": 4, "tie": false}``. Needs ``transformers``
(``pip install -e '.[hf]'``).
"""

from __future__ import annotations


def build(vocab_size: int = 256, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          tie: bool = True, intermediate_size: int | None = None, max_positions: int = 2048,
          attention: str = "sdpa", rope_theta: float = 10000.0):  # noqa: ANN201 (transformers is imported lazily)
    """A ``LlamaForCausalLM`` of this shape (``intermediate_size`` None: ``4 * hidden_size``; ``tie``: the LM head
    shares the embedding's weight; ``attention``: "sdpa" or "eager"). Its weights are drawn from torch's global
    generator, so a seed set before the call fixes them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie, rope_theta=rope_theta,
        attn_implementation=attention,
    )
    return LlamaForCausalLM(config)
