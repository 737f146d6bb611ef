import pytest
import torch

from lorq.adapters import LoRAConfig, add_adapters
from lorq.eval.perplexity import chunkable, next_token_nll
from lorq.train.data import IGNORE

from tests_helpers import randomize_B


def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_llama):
    add_adapters(tiny_llama, LoRAConfig(rank=4, dropout=0.0, targets=[r"layers\.\d+\.", "lm_head"]))
    randomize_B(tiny_llama)
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, :10] = IGNORE  # unlabelled positions get no logits in the chunked path
    out = {}
    for chunk in (0, 7, 4096):
        tiny_llama.zero_grad()
        nll, n = next_token_nll(tiny_llama, x, y, chunk)
        (nll / n).backward()
        out[chunk] = (nll.item(), n, torch.cat([p.grad.flatten() for p in tiny_llama.parameters() if p.requires_grad]))
    for chunk in (7, 4096):
        assert out[chunk][1] == out[0][1] == 2 * 39 - 9
        assert out[chunk][0] == pytest.approx(out[0][0], rel=1e-6)
        assert torch.allclose(out[chunk][2], out[0][2], atol=1e-6)


def test_models_that_rescale_logits_keep_the_full_path(tiny_llama):
    assert chunkable(tiny_llama)[0] is not None
    tiny_llama.config.final_logit_softcapping = 30.0
    assert chunkable(tiny_llama) == (None, None)


def test_fused_loss_of_a_plain_head_equals_the_full_logits_loss(tiny_llama):
    """Adapters on the decoder only: the output layer is a plain nn.Linear and takes the fused
    loss (gradient computed in forward); loss and adapter gradients match full logits."""
    add_adapters(tiny_llama, LoRAConfig(rank=4, dropout=0.0))
    randomize_B(tiny_llama)
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[1, 5:9] = IGNORE
    out = {}
    for chunk in (0, 16):
        tiny_llama.zero_grad()
        nll, n = next_token_nll(tiny_llama, x, y, chunk)
        (nll / n).backward()
        out[chunk] = (nll.item(), n, torch.cat([p.grad.flatten() for p in tiny_llama.parameters() if p.requires_grad]))
    assert out[16][1] == out[0][1]
    assert out[16][0] == pytest.approx(out[0][0], rel=1e-6)
    assert torch.allclose(out[16][2], out[0][2], atol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("length", [40, 20])  # 74 labelled tokens > hidden 64: (V, H) formed in forward; 34: deferred
def test_a_trained_tied_embedding_gets_the_full_logits_gradient_in_one_tensor(padding_idx, length):
    """Full-parameter training of a tied model: the fused loss hands the output layer's gradient
    to the embedding lookup. Loss and every gradient match transformers' own full-logits loss
    (padding rows of the lookup get no gradient there either), and one (vocab, hidden) gradient
    is allocated in all: in forward, or, for fewer tokens than the hidden size, from the kept
    logits gradient when backward reaches the lookup."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True, vocab_size=4096, pad_token_id=padding_idx))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = torch.randint(0, 4096, (2, length), generator=torch.Generator().manual_seed(0))
    x[0, :4] = 3
    y = x.clone()
    y[1, 5:9] = IGNORE
    out, vh = {}, 4096 * 64 * 4
    for chunk in (0, 16):
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as fwd:
            nll, n = next_token_nll(model, x, y, chunk)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as bwd:
            (nll / n).backward()
        big = [sum(e.self_cpu_memory_usage >= vh for e in p.events()) for p in (fwd, bwd)]
        out[chunk] = (nll.item(), {k: p.grad.clone() for k, p in model.named_parameters()}, big, n)
    (full_nll, full, _, _), (nll, fused, big, n) = out[0], out[16]
    assert nll == pytest.approx(full_nll, rel=1e-6)
    assert all(torch.allclose(fused[k], full[k], atol=1e-6) for k in full)
    if padding_idx is not None:  # the lm_head part of the padding row's gradient remains
        assert not torch.equal(fused["model.embed_tokens.weight"][3], torch.zeros(64))
    assert big == ([1, 0] if n > 64 else [0, 1])


def test_no_tokens_is_an_error_not_a_perfect_perplexity(tiny_llama):
    from lorq.errors import LorqError
    from lorq.eval.perplexity import perplexity
    from lorq.train.data import Blocks

    for blocks in (Blocks(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8, dtype=torch.long)),
                   Blocks(torch.ones(2, 8, dtype=torch.long), torch.full((2, 8), IGNORE))):
        with pytest.raises(LorqError, match="no tokens to evaluate"):
            perplexity(tiny_llama, blocks)
