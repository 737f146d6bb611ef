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


@pytest.fixture(scope="session")
def real_tokenizer_dir():
    """The embedded model's tokenizer (its cache is made on first use)."""
    from lorq.models.loading import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer_dir):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local HF directory."""
    from lorq.models.loading import load_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tok = load_tokenizer(real_tokenizer_dir)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok), max_position_embeddings=256))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_adapter(model_dir, out, seed: int, **lora) -> str:
    """A PEFT adapter with nonzero B for the model in model_dir (dense or lorq quantized)."""
    from lorq.adapters import LoRAConfig, add_adapters, save_peft
    from lorq.models.loading import load_model
    from tests_helpers import randomize_B

    torch.manual_seed(seed)
    model, _, _ = load_model(str(model_dir))
    add_adapters(model, LoRAConfig(dropout=0.0, **lora))
    randomize_B(model, seed=seed)
    save_peft(model, out)
    return str(out)


@pytest.fixture(scope="session")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters for the tiny model: rank 4 on every decoder linear, rank 8 rsLoRA on attention."""
    root = tmp_path_factory.mktemp("adapters")
    return (
        make_adapter(tiny_model_dir, root / "a", 1, rank=4, alpha=8),
        make_adapter(tiny_model_dir, root / "b", 2, rank=8, alpha=4, rslora=True, targets=[r"self_attn\.(q|k|v|o)_proj"]),
    )
