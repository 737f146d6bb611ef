"""Sampling controls against transformers' logits processors, and the log-probabilities the
server reports against a plain forward pass of the model with the adapter."""

import json
import urllib.request

import openai
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

from lorq.errors import LorqError
from lorq.serve.sampling import (
    SamplingParams, add_logit_bias, controlled, hold_back, keep_top_k, next_token, penalize_frequency, penalize_repetition,
    token_logprobs,
)
from serving_helpers import PROMPTS, many_adapters, start_server  # noqa: F401  (fixture)

V = 50
LOGITS = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 3


def test_repetition_penalty_is_transformers():
    seen = [3, 7, 7, 12, 40]
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), LOGITS[None].clone())[0]
    torch.testing.assert_close(penalize_repetition(LOGITS, seen, 1.3), want)


def test_top_k_is_transformers():
    want = TopKLogitsWarper(5)(None, LOGITS[None].clone())[0]
    assert torch.equal(keep_top_k(LOGITS, 5), want) and torch.equal(keep_top_k(LOGITS, 0), LOGITS)


def test_frequency_presence_bias_and_min_tokens():
    generated = [4, 4, 4, 9]
    out = penalize_frequency(LOGITS, generated, 0.5, 1.0)
    assert out[4] == pytest.approx(LOGITS[4] - 1.5 - 1.0) and out[9] == pytest.approx(LOGITS[9] - 0.5 - 1.0)
    assert torch.equal(out[[i for i in range(V) if i not in (4, 9)]], LOGITS[[i for i in range(V) if i not in (4, 9)]])
    assert add_logit_bias(LOGITS, {2: 100.0}).argmax() == 2
    assert hold_back(LOGITS, {int(LOGITS.argmax())}).argmax() != LOGITS.argmax()
    eos = {int(LOGITS.argmax())}
    p = SamplingParams(temperature=0, min_tokens=2)
    assert next_token(LOGITS, p, [1], [5], eos, None) != int(LOGITS.argmax())  # one token so far: EOS held back
    assert next_token(LOGITS, p, [1], [5, 6], eos, None) == int(LOGITS.argmax())
    assert torch.equal(controlled(LOGITS, SamplingParams(), [1], [], eos), LOGITS)  # no control: the model's logits


def test_token_logprobs_are_log_softmax():
    rows = torch.randn(3, V)
    got = token_logprobs(rows, [1, 2, 3], 4)
    logp = torch.log_softmax(rows, -1)
    assert [g.logprob for g in got] == pytest.approx([logp[0, 1].item(), logp[1, 2].item(), logp[2, 3].item()])
    assert [t for t, _ in got[0].top] == logp[0].topk(4).indices.tolist()
    assert token_logprobs(rows[:0], [], 2) == []


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=-2), "top_k"), (dict(min_tokens=20, max_tokens=10), "min_tokens"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(logit_bias={1: 200.0}), "logit_bias"), (dict(logprobs=21), "logprobs"),
])
def test_bad_sampling_values(bad, message):
    with pytest.raises(LorqError, match=message):
        SamplingParams(**bad).validate()


@pytest.fixture(scope="module")
def live(tiny_model_dir, many_adapters):
    server = start_server(tiny_model_dir, many_adapters, max_batch=8)
    yield server
    server.close()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, many_adapters):
    """log_softmax of the next-token logits of `lorq generate`'s model with adapter ad3."""
    from lorq.jobs import load_for_inference
    from lorq.quant.base import no_quant

    model, tok, _ = load_for_inference(str(tiny_model_dir), no_quant(), str(many_adapters / "ad3"))

    @torch.no_grad()
    def logp(ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    return logp, tok


def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def test_completion_logprobs_with_echo_are_the_models(live, oracle):
    logp, tok = oracle
    prompt = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    out = client(live).completions.create(model="ad3", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True)
    choice = out.choices[0]
    generated = tok(choice.text[len(tok.decode(prompt)):], add_special_tokens=False)["input_ids"]
    ids = prompt + generated
    lp = choice.logprobs
    assert choice.text.startswith(tok.decode(prompt)) and len(lp.tokens) == len(prompt) + 6 == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = logp(ids)
    assert lp.token_logprobs[1:] == pytest.approx([want[t, ids[t + 1]].item() for t in range(len(ids) - 1)], abs=1e-4)
    for t in range(len(prompt) - 1, len(ids) - 1):  # greedy: each generated token is the top alternative
        assert max(lp.top_logprobs[t + 1], key=lp.top_logprobs[t + 1].get) == lp.tokens[t + 1]
        assert len(lp.top_logprobs[t + 1]) <= 3
    assert lp.text_offset[len(prompt)] == len(tok.decode(prompt)) and "".join(lp.tokens) == choice.text


def test_streamed_logprobs_equal_the_whole_answers(live):
    c = client(live)
    kw = dict(model="ad3", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=2, echo=True)
    whole = c.completions.create(**kw).choices[0]
    chunks = list(c.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == whole.text
    tokens = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    offsets = [o for ch in chunks if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    chat = dict(model="ad3", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    answer = c.chat.completions.create(**chat).choices[0]
    entries = answer.logprobs.content
    assert len(entries) == 5 and all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries)
    assert all(e.bytes == list(e.token.encode()) for e in entries)
    streamed = [e for ch in c.chat.completions.create(stream=True, **chat) if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]


def test_sampling_controls_through_the_api(live, oracle):
    _, tok = oracle
    c = client(live)
    forced = c.completions.create(model="ad1", prompt=PROMPTS[3], max_tokens=5, temperature=0, logit_bias={"42": 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [tok.decode([42])] * 5
    eos = tok.eos_token_id
    early = c.completions.create(model="ad1", prompt=PROMPTS[3], max_tokens=10, temperature=0, logit_bias={str(eos): 100},
                                 extra_body={"min_tokens": 3})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens == 4  # EOS held back for 3 tokens
    plain = c.completions.create(model="ad1", prompt=PROMPTS[4], max_tokens=12, temperature=0).choices[0].text
    penalized = c.completions.create(model="ad1", prompt=PROMPTS[4], max_tokens=12, temperature=0, frequency_penalty=2.0,
                                     presence_penalty=2.0, extra_body={"repetition_penalty": 1.5, "top_k": 5}).choices[0].text
    assert penalized != plain
    for body, param in [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, None), ({"top_k": -3}, "top_k"),
                        ({"logprobs": 30}, None), ({"top_logprobs": 2}, "top_logprobs")]:
        chat = "top_logprobs" in body
        path = "/v1/chat/completions" if chat else "/v1/completions"
        req = {"model": "ad1", "max_tokens": 2, **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}), **body}
        request = urllib.request.Request(live.url + path, data=json.dumps(req).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        error = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and error["message"], body
        assert param is None or error["param"] == param
