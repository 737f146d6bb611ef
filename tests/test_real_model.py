"""The embedded SmolLM2-135M end to end (slower; runs in CI too)."""

import pytest

from lorq.eval import generate_text, perplexity
from lorq.quant import DECODER_LINEARS, FormatConfig, quantize_model
from lorq.train.data import DataConfig, load_blocks

pytestmark = pytest.mark.real_model


def test_nf4_base_perplexity_and_generation(real_model):
    import copy

    model, tok, _ = real_model
    val = load_blocks(tok, DataConfig(block_size=256))[1].take(2)
    fp32 = perplexity(model, val)["ppl"]
    q = copy.deepcopy(model)
    report = quantize_model(q, [(DECODER_LINEARS, FormatConfig())], progress=False)
    assert 4.12 < report.bits_per_weight < 4.14 and len(report.modules) == 30 * 7
    nf4 = perplexity(q, val)["ppl"]
    assert 5 < fp32 < nf4 < 2 * fp32  # NF4 costs accuracy on this small model, but not much
    text = generate_text(q, tok, "What is a Python list?", max_new_tokens=8)
    assert len(text.strip()) > 0
