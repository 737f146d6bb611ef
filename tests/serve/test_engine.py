import pytest
import torch

from lorq.errors import LorqError
from lorq.eval.generate import encode_prompt
from lorq.models.loading import load_model
from lorq.serve import AdapterStore, Engine, EngineConfig, QueueFull, SamplingParams
from lorq.serve.engine import safe_prefix, stop_cut
from lorq.serve.sampling import nucleus_sample
from serving_helpers import PROMPTS, References, many_adapters  # noqa: F401  (fixture)


def engine_for(model_dir, root, **cfg):
    model, tok, _ = load_model(str(model_dir))
    engine = Engine(model, tok, EngineConfig(**cfg))
    store = AdapterStore(root, engine.layers, 1 << 30)
    store.discover()
    return engine, store, tok


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_mixed_batch_greedy_equals_generate_per_adapter(tiny_model_dir, many_adapters):
    """Base and 10 adapters of 4 ranks on 3 layer sets in one continuous batch of at most 4
    sequences: every output equals `lorq generate` with that adapter alone."""
    engine, store, tok = engine_for(tiny_model_dir, many_adapters, max_batch=4, max_batch_tokens=40)
    names = [None] + store.names
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)], 6 + i % 7) for i in range(22)]
    seqs = engine.generate([(encode_prompt(tok, p), store.acquire(a) if a else None, greedy(n)) for a, p, n in jobs])
    ref = References(tiny_model_dir, many_adapters)
    assert [s.text for s in seqs] == [ref(a, p, n, chat=True) for a, p, n in jobs]
    assert engine.steps < sum(n for _, _, n in jobs)  # batched, not one request after another
    assert not engine.busy
    assert engine.gather_cache.key is None and not engine.gather_cache.stacks  # idle: no adapter stacks held


def test_requests_join_and_leave_between_steps(tiny_model_dir, many_adapters):
    engine, store, tok = engine_for(tiny_model_dir, many_adapters)
    done = []
    long = engine.submit(encode_prompt(tok, PROMPTS[0]), store.acquire("ad1"), greedy(12), lambda d, r: done.append(("long", r)) if r else None)
    for _ in range(3):
        engine.step()
    assert len(long.generated) == 3
    short = engine.submit(encode_prompt(tok, PROMPTS[1]), store.acquire("ad2"), greedy(2), lambda d, r: done.append(("short", r)) if r else None)
    engine.step()  # short's prompt is prefilled in the same pass as long's 4th token
    assert len(long.generated) == 4 and len(short.generated) == 1 and len(engine.running) == 2
    engine.step()
    assert done == [("short", "length")] and engine.running == [long]
    while engine.busy:
        engine.step()
    ref = References(tiny_model_dir, many_adapters)
    assert long.text == ref("ad1", PROMPTS[0], 12, True) and short.text == ref("ad2", PROMPTS[1], 2, True)


def test_stop_strings_cut_the_text_and_stream_in_pieces(tiny_model_dir, many_adapters):
    engine, store, tok = engine_for(tiny_model_dir, many_adapters)
    prompt = encode_prompt(tok, PROMPTS[3])
    (full,) = engine.generate([(prompt, None, greedy(24))])
    assert full.finish_reason == "length" and len(full.generated) == 24
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    deltas = []
    seq = engine.submit(prompt, None, SamplingParams(max_tokens=24, temperature=0, stop=[stop]), lambda d, r: deltas.append((d, r)))
    while engine.busy:
        engine.step()
    assert seq.finish_reason == "stop" and seq.text == full.text[: full.text.find(stop)]
    assert "".join(d for d, _ in deltas) == seq.text and deltas[-1][1] == "stop" and len(deltas) > 2


def test_sampling_is_seeded(tiny_model_dir):
    engine, _, tok = engine_for(tiny_model_dir, None)
    prompt = encode_prompt(tok, PROMPTS[0])
    runs = engine.generate([(prompt, None, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=s)) for s in (7, 7, 8)])
    assert runs[0].generated == runs[1].generated != runs[2].generated


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert {nucleus_sample(logits, 1.0, 0.5, g) for _ in range(50)} == {0}
    assert {nucleus_sample(logits, 1.0, 0.8, g) for _ in range(200)} == {0, 1}
    assert {nucleus_sample(logits, 1.0, 0.81, g) for _ in range(400)} == {0, 1, 2}
    # min_p: at least min_p x the top probability (0.5); with top-p, the tokens both keep
    assert {nucleus_sample(logits, 1.0, 1.0, g, min_p=0.29) for _ in range(400)} == {0, 1, 2}
    assert {nucleus_sample(logits, 1.0, 1.0, g, min_p=0.31) for _ in range(400)} == {0, 1}
    assert {nucleus_sample(logits, 1.0, 0.5, g, min_p=0.3) for _ in range(100)} == {0}


def test_stop_helpers():
    assert stop_cut("abc STOP def", ["STOP", "c S"]) == 2
    assert stop_cut("abc", ["x"]) is None
    assert stop_cut("abc STOP def", ["STOP", "c S"], include=True) == 5  # the first to start, kept whole
    assert safe_prefix("hello wor", ["world"]) == len("hello ")  # "wor" may become "world"
    assert safe_prefix("hello", ["xyz"]) == 5
    assert safe_prefix("caf\ufffd", []) == 3  # a partial UTF-8 character waits for its rest


def test_quantized_base_equals_generate(tiny_model_dir, many_adapters):
    from lorq.eval.generate import generate_text
    from lorq.jobs import load_for_inference, prepare_base
    from lorq.quant import FormatConfig

    nf4 = FormatConfig(format="nf4")
    base = prepare_base(str(tiny_model_dir), nf4)
    engine = Engine(base.model, base.tok)
    store = AdapterStore(many_adapters, engine.layers, 1 << 30)
    store.discover()
    seqs = engine.generate([(encode_prompt(base.tok, p), store.acquire(a), greedy(8)) for a, p in [("ad0", PROMPTS[0]), ("ad3", PROMPTS[1])]])
    for (a, p), seq in zip([("ad0", PROMPTS[0]), ("ad3", PROMPTS[1])], seqs):
        model, tok, _ = load_for_inference(str(tiny_model_dir), nf4, str(many_adapters / a))
        assert seq.text == generate_text(model, tok, p, 8)


def test_bad_requests_and_a_full_queue(tiny_model_dir, many_adapters):
    engine, _, tok = engine_for(tiny_model_dir, None, max_queue=2)
    prompt = encode_prompt(tok, "hi")
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(stop=[""])):
        with pytest.raises(LorqError):
            engine.submit(prompt, None, SamplingParams(**bad), lambda d, r: None)
    with pytest.raises(LorqError, match="exceeds the model's context of 256 tokens"):
        engine.submit(prompt, None, greedy(1000), lambda d, r: None)
    short, _, _ = engine_for(tiny_model_dir, None, max_model_len=len(prompt) + 3)
    short.submit(prompt, None, greedy(3), lambda d, r: None)
    with pytest.raises(LorqError, match=f"exceeds --max-model-len of {len(prompt) + 3} tokens"):
        short.submit(prompt, None, greedy(4), lambda d, r: None)
    with pytest.raises(LorqError, match=r"prompt \(300 tokens\) leaves no room to generate within the model's context of 256") as e:
        engine.submit(prompt * (300 // len(prompt)) + prompt[: 300 % len(prompt)], None, greedy(1), lambda d, r: None)
    assert "max_tokens" not in str(e.value)  # a chat request's max_tokens may be the server's default, not the client's
    with pytest.raises(LorqError, match="empty"):
        engine.submit([], None, greedy(4), lambda d, r: None)
    halves = AdapterStore(many_adapters, engine.layers, 1 << 30, torch.bfloat16)  # not the engine's fp32
    halves.discover()
    with pytest.raises(LorqError, match="holds bfloat16 weights, the engine runs float32"):
        engine.submit(prompt, halves.acquire("ad0"), greedy(2), lambda d, r: None)
    for _ in range(2):
        engine.submit(prompt, None, greedy(2), lambda d, r: None)
    with pytest.raises(QueueFull):
        engine.submit(prompt, None, greedy(2), lambda d, r: None)


def test_a_failed_step_ends_its_requests_with_an_error(tiny_model_dir, capsys):
    import threading

    engine, _, tok = engine_for(tiny_model_dir, None)
    done = {}
    events = {name: threading.Event() for name in ("first", "second")}

    def on_event(name):
        return lambda d, r: (done.__setitem__(name, r), events[name].set()) if r else None

    def broken(*a, **k):
        raise RuntimeError("boom")

    engine.model.forward = broken  # the instance attribute shadows the class's forward
    engine.start()
    engine.submit(encode_prompt(tok, "hi"), None, greedy(3), on_event("first"))
    assert events["first"].wait(30) and done["first"] == "error"
    del engine.model.forward
    engine.submit(encode_prompt(tok, "hi"), None, greedy(3), on_event("second"))
    assert events["second"].wait(30) and done["second"] == "length"
    engine.stop()
    assert "engine step failed: RuntimeError: boom" in capsys.readouterr().out


def test_abort_takes_a_waiting_request_out_of_the_queue_at_once(tiny_model_dir):
    engine, _, tok = engine_for(tiny_model_dir, None, max_queue=1)
    finished = []
    engine.on_finish = finished.append
    seq = engine.submit(encode_prompt(tok, "hi"), None, greedy(2), lambda d, r: None)
    engine.abort(seq)
    assert finished == [seq] and seq.finish_reason == "abort" and engine.queue_depth == 0
    engine.submit(encode_prompt(tok, "hi"), None, greedy(2), lambda d, r: None)  # its place is free again
    while engine.busy:
        engine.step()
    assert len(finished) == 2  # each finished exactly once


def test_a_tiny_temperature_samples_the_argmax():
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert nucleus_sample(logits, 1e-45, 1.0, torch.Generator().manual_seed(0)) == 1


def test_a_finished_request_leaves_nothing_in_its_kv_slot(tiny_model_dir):
    """A decoding sequence reads its KV slot up to the batch's longest length, masked past its
    own; the mask weighs stale entries by 0, but 0 x NaN is NaN. So what a diverged request
    wrote (NaN keys and values) must be gone before its slot serves another request."""
    engine, _, tok = engine_for(tiny_model_dir, None)
    long_p, short_p = encode_prompt(tok, " ".join(PROMPTS)), encode_prompt(tok, "hi")
    (alone,) = engine.generate([(short_p, None, greedy(6))])
    poisoned = engine.submit(long_p, None, greedy(3), lambda d, r: None)
    engine.step()
    for t in engine.pool.k + engine.pool.v:
        t[poisoned.slot, :, : poisoned.cached] = float("nan")  # what a diverged adapter leaves behind
    while engine.busy:
        engine.step()
    short, _ = engine.generate([(short_p, None, greedy(6)), (long_p, None, greedy(9))])  # short takes the poisoned slot 0
    assert short.text == alone.text
    assert not any(t.any() for t in engine.pool.k + engine.pool.v)  # every slot freed, moved-from ones too


def test_sequences_outgrowing_the_kv_budget_are_preempted_and_recomputed(tiny_model_dir):
    """Three requests fit the budget when they join; as they decode, the pool at their length
    would not: the latest admitted goes back to the queue, its slot freed, and rejoins later with
    prompt + generated tokens as its prompt. The pool stays within the budget at every step and
    each output is what the request gives alone."""
    engine, _, tok = engine_for(tiny_model_dir, None, max_batch=8)
    prompts = [encode_prompt(tok, p)[:20] for p in PROMPTS[:3]]
    alone = [engine.generate([(p, None, greedy(70))])[0].generated for p in prompts]
    engine.kv_budget = engine.pool.bytes_for(2, 128)
    seqs = [engine.submit(p, None, greedy(70), lambda d, r: None) for p in prompts]
    engine.step()
    assert len(engine.running) == 3  # all three fit at first (3 slots x 64 positions)
    while engine.busy:
        engine.step()
        assert engine.pool.nbytes <= engine.kv_budget
    assert engine.preemptions >= 1
    assert [s.generated for s in seqs] == alone and all(s.finish_reason == "length" for s in seqs)


def test_preemption_with_adapters_prompt_logprobs_and_an_abort(tiny_model_dir, many_adapters):
    """A preempted sequence keeps its prompt's log-probabilities (scored once) and its
    adapter; one aborted while it waits to rejoin finishes once; every adapter is released."""
    engine, store, tok = engine_for(tiny_model_dir, many_adapters, max_batch=8)
    prompts = [encode_prompt(tok, p)[:20] for p in PROMPTS[:3]]
    params = lambda: SamplingParams(max_tokens=70, temperature=0.0, logprobs=2, prompt_logprobs=True)  # noqa: E731
    alone = [engine.generate([(p, store.acquire("ad5"), params())])[0] for p in prompts]
    for _ in alone:
        store.release("ad5")
    engine.kv_budget = engine.pool.bytes_for(2, 128)
    engine.on_finish = lambda seq: store.release(seq.adapter.name)  # as the server does
    ends = []
    seqs = [engine.submit(p, store.acquire("ad5"), params(), lambda d, r: ends.append(r) if r else None) for p in prompts]
    while not engine.preemptions:
        engine.step()
    waiting = next(s for s in seqs if s in engine.waiting)
    engine.abort(waiting)
    while engine.busy:
        engine.step()
    for seq, ref in zip(seqs, alone):
        assert [(e.token, round(e.logprob, 4)) for e in seq.prompt_logprobs] == [(e.token, round(e.logprob, 4)) for e in ref.prompt_logprobs]
        if seq is not waiting:
            assert seq.generated == ref.generated and len(seq.logprobs) == 70
    assert sorted(ends) == ["abort", "length", "length"] and waiting.finish_reason == "abort"
    assert not store.in_use


def test_the_kv_cache_admits_within_its_budget_and_is_given_back(tiny_model_dir):
    """One long request used to size every batch slot to its length for the server's lifetime.
    Now a request joins only while the pool, at the running sequences' lengths, fits the budget;
    outputs are unchanged; the pool shrinks once the long sequence has left."""
    engine, _, tok = engine_for(tiny_model_dir, None, max_batch=8)
    long_p = encode_prompt(tok, " ".join(PROMPTS * 3))[:180]
    shorts = [encode_prompt(tok, p) for p in PROMPTS[:4]]
    assert all(len(p) < 64 for p in shorts)
    engine.kv_budget = engine.pool.bytes_for(2, len(long_p))  # the long prompt and one more at its length
    alone = [engine.generate([(p, None, greedy(8))])[0].text for p in [long_p, *shorts]]
    seqs = [engine.submit(p, None, greedy(8), lambda d, r: None) for p in [long_p, *shorts]]
    engine.step()
    assert len(engine.running) == 2 and engine.pool.nbytes <= engine.kv_budget  # the others wait for room
    while engine.busy:
        engine.step()
    assert [s.text for s in seqs] == alone
    assert engine.pool.nbytes <= engine.pool.bytes_for(1, 64)  # nothing running: back to the smallest pool
    engine.kv_budget = engine.pool.bytes_for(1, 64)
    with pytest.raises(LorqError, match="needs .* MiB of KV cache, more than the server's budget"):
        engine.submit(shorts[0], None, greedy(100), lambda d, r: None)


@pytest.mark.parametrize("fmt", ["none", "nf"])
def test_bf16_serving_equals_bf16_generate(tiny_model_dir, many_adapters, fmt, capsys, monkeypatch):
    """--precision bf16: `lorq serve` holds its weights and KV cache in bf16 (quantized codes and
    scales stay as stored) and answers greedily as `lorq generate --precision bf16` does."""
    from lorq import jobs as job
    from lorq.cli import main
    from lorq.jobs import serving_server
    from lorq.quant import FormatConfig, QuantizedLinear
    from lorq.serve.server import ServeConfig

    server = serving_server(ServeConfig(model=str(tiny_model_dir), adapters=str(many_adapters), precision="bf16", quant=FormatConfig(format=fmt)))
    engine, store = server.engine, server.store
    assert engine.dtype == engine.pool.k[0].dtype == torch.bfloat16
    quantized = [m for m in engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert bool(quantized) == (fmt == "nf")
    assert all(b.dtype != torch.bfloat16 for m in quantized for b in m.buffers())  # codes, scales as stored
    jobs = [("ad0", PROMPTS[0]), ("ad3", PROMPTS[1]), (None, PROMPTS[3])]
    seqs = engine.generate([(encode_prompt(engine.tok, p), store.acquire(a) if a else None, greedy(8)) for a, p in jobs])
    seen, real = [], job.generate_text
    monkeypatch.setattr(job, "generate_text", lambda model, *a, **k: seen.append({p.dtype for p in model.parameters()}) or real(model, *a, **k))
    for (a, p), seq in zip(jobs, seqs):
        adapter = ["--adapter", str(many_adapters / a)] if a else []
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", p, "--max-new-tokens", "8", "--precision", "bf16", "--format", fmt] + adapter) == 0
        assert capsys.readouterr().out == seq.text + "\n"
    assert seen == [{torch.bfloat16}] * len(jobs)  # adapters included


def test_stop_token_ids_and_stop_strings_kept_in_the_output(tiny_model_dir):
    """vLLM's stop_token_ids end a sequence like EOS, their text left out unless
    include_stop_str_in_output (which also keeps a stop string), and are held back before
    min_tokens."""
    engine, _, tok = engine_for(tiny_model_dir, None)
    prompt = encode_prompt(tok, PROMPTS[0])
    full = engine.generate([(prompt, None, greedy(12))])[0]
    k = 3
    stopper = full.generated[k]
    first = full.generated.index(stopper)
    at, shown, held = engine.generate([
        (prompt, None, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stopper])),
        (prompt, None, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stopper], include_stop_str_in_output=True)),
        (prompt, None, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stopper], min_tokens=first + 2))])
    assert at.generated == shown.generated == full.generated[: first + 1] and at.finish_reason == shown.finish_reason == "stop"
    assert at.text == tok.decode(full.generated[:first], skip_special_tokens=True)
    assert shown.text == tok.decode(full.generated[: first + 1], skip_special_tokens=True) != at.text
    assert stopper not in held.generated[: first + 2] and len(held.generated) >= first + 2  # not chosen before min_tokens
    stop = full.text[4:6]
    cut, kept = engine.generate([(prompt, None, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])),
                                 (prompt, None, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop], include_stop_str_in_output=True))])
    assert cut.text == full.text[: full.text.index(stop)] and kept.text == full.text[: full.text.index(stop) + len(stop)]
    with pytest.raises(LorqError, match="stop_token_ids must hold token IDs"):
        engine.submit(prompt, None, SamplingParams(stop_token_ids=[10**6]), lambda d, r: None)
