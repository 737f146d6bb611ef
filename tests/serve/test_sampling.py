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
    assert bytes(b for e in entries for b in e.bytes).decode() == answer.message.content
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
    for body, param in [({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"top_k": -3}, "top_k"),
                        ({"logprobs": 30}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"), ({"temperature": 3}, "temperature"),
                        ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"),
                        ({"logit_bias": {"1": 101}}, "logit_bias"), ({"min_tokens": 5}, "min_tokens"), ({"repetition_penalty": 0}, "repetition_penalty")]:
        chat = "top_logprobs" in body
        path = "/v1/chat/completions" if chat else "/v1/completions"
        req = {"model": "ad1", "max_tokens": 2, **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}), **body}
        request = urllib.request.Request(live.url + path, data=json.dumps(req).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        error = json.loads(e.value.read())["error"]
        assert e.value.code == 400 and error["message"], body
        assert error["param"] == param, (body, error)


def test_token_bytes_are_exact_where_a_token_splits_a_character(oracle):
    from lorq.serve.logprobs import LogprobCursor, Scored, TokenText, byte_level_alphabet

    _, tok = oracle
    assert sorted(byte_level_alphabet().values()) == list(range(256))
    text = "héllo 你好 🙂 wörld <|im_start|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tt = TokenText(tok)
    raws = [tt.raw(t) for t in ids]
    assert b"".join(raws) == text.encode() and any(r.decode("utf-8", "replace") != r.decode("utf-8", "ignore") for r in raws)

    class Seq:
        logprobs = []

    cursor = LogprobCursor(tt, [Seq()])
    offsets = cursor.offsets(0, [Scored(r, None, None) for r in raws])
    assert offsets == [len(b"".join(raws[:i]).decode("utf-8", "ignore")) for i in range(len(raws))]
    for raw, start in zip(raws, offsets):
        shown = Scored(raw, None).text
        if raw.decode("utf-8", "replace") == raw.decode("utf-8", "ignore"):
            assert text[start : start + len(shown)] == shown
        else:  # part of a character: spelled as its bytes, OpenAI's way
            assert shown == "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def test_alternatives_that_split_characters_stay_apart():
    """Two tokens holding different halves of characters both decode to U+FFFD; as keys of a
    completion's top_logprobs they must not collapse into one."""
    from lorq.serve.logprobs import Scored
    from lorq.serve.protocol import completion_logprobs

    top = [Scored(b"\xce", -1.0), Scored(b"\xcf", -2.0), Scored(b"a", -3.0)]
    lp = completion_logprobs([Scored(b"\xce", -1.0, top)], [0])
    assert lp["top_logprobs"] == [{"bytes:\\xce": -1.0, "bytes:\\xcf": -2.0, "a": -3.0}]
    assert lp["tokens"] == ["bytes:\\xce"]


def test_lm_evaluation_harness_loglikelihood_request(live, oracle):
    """lm-evaluation-harness's local-completions model scores a continuation with token-ID
    prompts, echo, logprobs=1 and max_tokens=1, reading token_logprobs[ctxlen:-1] and the
    top alternative of each position (is the continuation greedy?)."""
    logp, tok = oracle
    contexts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:2]]
    continuation = tok(" context manager", add_special_tokens=False)["input_ids"]
    prompts = [c + continuation for c in contexts]
    out = client(live).completions.create(model="ad3", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    assert len(out.choices) == 2
    for ids, ctx, choice in zip(prompts, contexts, out.choices):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        want = logp(ids)
        scores = lp.token_logprobs[len(ctx) : -1]
        assert scores == pytest.approx([want[t - 1, ids[t]].item() for t in range(len(ctx), len(ids))], abs=1e-4)
        greedy = all(max(top, key=top.get) == tok_text for top, tok_text in zip(lp.top_logprobs[len(ctx) : -1], lp.tokens[len(ctx) : -1]))
        assert greedy == all(want[t - 1].argmax().item() == ids[t] for t in range(len(ctx), len(ids)))
        assert all(len(top) in (1, 2) for top in lp.top_logprobs[1:])  # the top one, and the token itself when it is not


def test_min_tokens_holds_back_stop_strings_too(live):
    c = client(live)
    text = c.completions.create(model="ad2", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    stop = text[1:3]
    early = c.completions.create(model="ad2", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    held = c.completions.create(model="ad2", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop], extra_body={"min_tokens": 5})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens < 5
    assert held.usage.completion_tokens >= 5


def test_repetition_penalty_greedy_equals_lorq_generate(tiny_model_dir, many_adapters):
    """Two implementations, one answer: the engine's penalty against transformers' generate
    (what `lorq generate --repetition-penalty` runs), greedy, with an adapter."""
    from lorq.eval.generate import encode_prompt, generate_text
    from lorq.jobs import load_for_inference
    from lorq.models.loading import load_model
    from lorq.quant.base import no_quant
    from lorq.serve import AdapterStore, Engine

    model, tok, _ = load_for_inference(str(tiny_model_dir), no_quant(), str(many_adapters / "ad4"))
    want = [generate_text(model, tok, p, 24, repetition_penalty=1.8) for p in PROMPTS[:3]]
    plain = [generate_text(model, tok, p, 24) for p in PROMPTS[:3]]
    base, tok, _ = load_model(str(tiny_model_dir))
    engine = Engine(base, tok)
    store = AdapterStore(many_adapters, engine.layers, 1 << 30)
    store.discover()
    seqs = engine.generate([(encode_prompt(tok, p), store.acquire("ad4"), SamplingParams(max_tokens=24, temperature=0, repetition_penalty=1.8))
                            for p in PROMPTS[:3]])
    assert [s.text for s in seqs] == want != plain


def test_streamed_logprobs_never_run_ahead_of_the_text(live):
    """Text that may still become a stop string is held back; the log-probabilities of its
    tokens come with the chunk that completes them, not before: after every chunk the tokens
    sent spell a prefix of the text sent, and at the end all of it."""
    c = client(live)
    stops = ["e§", "s§", "t§", " §"]  # a text ending in e, s, t or a space waits for the next token
    behind = 0
    for prompt in PROMPTS[:3]:
        text, tokens = "", []
        for ch in c.completions.create(model="ad6", prompt=prompt, max_tokens=20, temperature=0, logprobs=0, stop=stops, stream=True):
            choice = ch.choices[0]
            text += choice.text
            tokens += choice.logprobs.tokens if choice.logprobs else []
            split = any(t.startswith("bytes:") for t in tokens)  # a token holding part of a character
            spelled = "".join(t for t in tokens if not t.startswith("bytes:"))
            assert text.startswith(spelled) or split, (text, spelled)
            behind += len(spelled) < len(text)
        assert spelled == text or split
    assert behind  # some text was sent before its last token's log-probability


def test_greedy_rows_take_the_first_maximum_as_argmax_does():
    from lorq.serve.sampling import greedy, greedy_rows

    logits = torch.randn(5, 1000).bfloat16()
    logits[1, [7, 300]] = 50.0  # a tie: the first one
    logits[2, 999] = float("nan")  # NaN wins, as torch's argmax has it
    assert greedy_rows(logits) == logits.argmax(-1).tolist() and greedy_rows(logits)[1] == 7
    assert [greedy(row) for row in logits] == logits.argmax(-1).tolist()
