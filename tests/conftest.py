import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**kw) -> LlamaConfig:
    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg.update(kw)
    return LlamaConfig(**cfg)


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (converted once, then loaded from ~/.cache/lorq)."""
    from lorq.models.loading import load_model

    return load_model(None)
