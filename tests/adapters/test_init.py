"""Low-rank factors as the LoRA initialization: the adapted model starts exactly at Q + L1 L2,
and the PEFT export (with its quantized base saved beside it) reloads to the same outputs."""

import torch

from lorq.adapters import LoRAConfig, add_adapters, load_peft, save_peft
from lorq.adapters.init import init_from_factors, pop_compensation
from lorq.quant import DECODER_LINEARS, FormatConfig, Rule, quantize_model, save_quantized
from lorq.models.loading import load_model


def test_factors_initialize_lora_and_export_round_trips(tiny_model_dir, tmp_path):
    model, tok, _ = load_model(str(tiny_model_dir))
    rule = Rule(DECODER_LINEARS, FormatConfig("nf", bits=3, group_size=32).validate(), lowrank="lq-lora", rank=4)
    report = quantize_model(model, [rule], progress=False)
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        compensated = model(input_ids=ids).logits
    factors = pop_compensation(model)
    assert len(factors) == 14 and all(m.rank == 0 for n, m in model.named_modules() if n in factors)
    save_quantized(model, tok, tmp_path / "base", report, rules=[rule])
    add_adapters(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    init_from_factors(model, "default", factors)
    model.eval()
    with torch.no_grad():
        started = model(input_ids=ids).logits
    assert torch.allclose(started, compensated, atol=1e-4)  # training starts from Q + L1 L2
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 28  # A and B of each layer; the factors are no longer frozen buffers
    save_peft(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    again, _, _ = load_model(str(tmp_path / "base"))
    load_peft(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again.eval()(input_ids=ids).logits, compensated, atol=1e-4)


def test_rank_mismatch_is_a_clear_error(tiny_llama):
    import pytest

    from lorq.errors import LorqError

    quantize_model(tiny_llama, [Rule(DECODER_LINEARS, FormatConfig("nf", bits=3, group_size=32).validate(), lowrank="lorc", rank=4)], progress=False)
    factors = pop_compensation(tiny_llama)
    add_adapters(tiny_llama, LoRAConfig(rank=8))
    with pytest.raises(LorqError, match="rank-8 adapter"):
        init_from_factors(tiny_llama, "default", factors)
