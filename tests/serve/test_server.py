"""The HTTP server against the official openai client, on a live uvicorn at 127.0.0.1."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager

import openai
import pytest

from serving_helpers import PROMPTS, References, free_port, many_adapters, start_server  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def live(tiny_model_dir, many_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    for name in os.listdir(many_adapters):
        shutil.copytree(many_adapters / name, root / name)
    server = start_server(tiny_model_dir, root, max_batch=8)
    yield server
    server.close()


@pytest.fixture(scope="module")
def ref(tiny_model_dir, many_adapters):
    return References(tiny_model_dir, many_adapters)


def client(live, **kw):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def test_models_lists_base_and_adapters(live):
    ids = [m.id for m in client(live).models.list()]
    assert ids[0] == "tiny" and set(ids[1:]) >= {f"ad{i}" for i in range(10)}
    c = client(live)
    assert c.models.retrieve("ad3").parent == "tiny" and c.models.retrieve("tiny").parent is None
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        c.models.retrieve("nope")


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_json_body_is_read_whatever_its_content_type(live, ref, content_type):
    """`curl -d '{...}'` labels its JSON as a form; the API takes only JSON, so it reads it."""
    import http.client
    from urllib.parse import urlsplit

    body = json.dumps({"model": "ad3", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}).encode()
    url = urlsplit(live.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)  # urllib would add a form type where none is given
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": content_type} if content_type else {})
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read())["choices"][0]["text"] == ref("ad3", PROMPTS[0], 4, chat=False)
    conn.close()


def test_completion_and_chat_equal_offline_generate(live, ref):
    c = client(live)
    out = c.completions.create(model="ad3", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert out.choices[0].text == ref("ad3", PROMPTS[0], 10, chat=False)
    assert out.usage.completion_tokens == 10 and out.choices[0].finish_reason == "length"
    chat = c.chat.completions.create(model="ad5", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=9, temperature=0)
    assert chat.choices[0].message.content == ref("ad5", PROMPTS[1], 9, chat=True)
    base = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=9, temperature=0)
    assert base.choices[0].message.content == ref(None, PROMPTS[1], 9, chat=True)
    two = c.completions.create(model="ad1", prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert [ch.text for ch in sorted(two.choices, key=lambda ch: ch.index)] == [ref("ad1", p, 5, chat=False) for p in PROMPTS[:2]]


def test_streaming_gives_the_same_text(live, ref):
    c = client(live)
    chunks = list(c.chat.completions.create(model="ad2", messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref("ad2", PROMPTS[3], 12, chat=True)
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"
    parts = list(c.completions.create(model="ad7", prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == ref("ad7", PROMPTS[2], 8, chat=False) and len(parts) > 2


def test_load_and_unload_adapters_only_from_the_root(live, many_adapters, tmp_path):
    c = client(live)
    post = lambda path, body: c.post(path, body=body, cast_to=str)  # noqa: E731
    assert "Success" in post("/load_lora_adapter", {"lora_name": "extra", "lora_path": "ad4"})
    assert "extra" in [m.id for m in c.models.list()]
    c.completions.create(model="extra", prompt="hi", max_tokens=2)
    os.symlink(many_adapters / "ad1", live.state.store.root / "escape")
    shutil.copytree(many_adapters / "ad1", live.state.store.root / "broken")
    config = live.state.store.root / "broken" / "adapter_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "lora_alpha"}))  # a KeyError inside
    for body, status in [
        ({"lora_name": "x", "lora_path": "../ad1"}, 400), ({"lora_name": "x", "lora_path": str(many_adapters / "ad1")}, 400),
        ({"lora_name": "x", "lora_path": "escape"}, 400), ({"lora_name": "x", "lora_path": "nope"}, 404),
        ({"lora_name": "extra", "lora_path": "ad4"}, 400), ({"lora_name": "../x"}, 400), ({"lora_name": "tiny"}, 400), ({}, 400),
        ({"lora_name": "x", "lora_path": "a" * 300}, 400), ({"lora_name": "x", "lora_path": "broken"}, 400),
    ]:
        with pytest.raises(openai.APIStatusError) as e:
            post("/load_lora_adapter", body)
        assert e.value.status_code == status, body
    inside = str(live.state.store.root / "ad1")  # absolute, though under the root: quoted as sent, not scrubbed to 'ad1'
    with pytest.raises(openai.BadRequestError, match=re.escape(f"adapter path {inside!r} must be a relative path")):
        post("/load_lora_adapter", {"lora_name": "x", "lora_path": inside})
    assert "Success" in post("/unload_lora_adapter", {"lora_name": "extra"})
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="extra", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        post("/unload_lora_adapter", {"lora_name": "extra"})


def test_n_choices_per_prompt_each_sampled_on_its_own(live, ref):
    c = client(live)
    greedy = c.completions.create(model="ad4", prompt=PROMPTS[:2], max_tokens=5, temperature=0, n=3)
    texts = [ch.text for ch in sorted(greedy.choices, key=lambda ch: ch.index)]
    assert texts == [ref("ad4", p, 5, chat=False) for p in PROMPTS[:2] for _ in range(3)]  # choice i·n + j: prompt i
    assert greedy.usage.completion_tokens == 30
    alone = [c.completions.create(model="ad4", prompt=p, max_tokens=1, temperature=0).usage.prompt_tokens for p in PROMPTS[:2]]
    assert greedy.usage.prompt_tokens == sum(alone)  # each prompt counted once, not once per choice
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    sampled = c.chat.completions.create(model="ad6", messages=msgs, max_tokens=12, temperature=1.0, seed=5, n=4)
    answers = [ch.message.content for ch in sorted(sampled.choices, key=lambda ch: ch.index)]
    assert len(set(answers)) > 1  # not four copies of one sample
    again = c.chat.completions.create(model="ad6", messages=msgs, max_tokens=12, temperature=1.0, seed=5, n=4)
    assert [ch.message.content for ch in sorted(again.choices, key=lambda ch: ch.index)] == answers  # reproducible
    first = c.chat.completions.create(model="ad6", messages=msgs, max_tokens=12, temperature=1.0, seed=5)
    assert first.choices[0].message.content == answers[0]  # choice 0 is the request's own seed
    chunks = list(c.chat.completions.create(model="ad6", messages=msgs, max_tokens=12, temperature=1.0, seed=5, n=4, stream=True))
    streamed = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i) for i in range(4)]
    assert streamed == answers
    assert sorted(ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason) == [0, 1, 2, 3]


def test_invalid_requests_get_400_and_unknown_models_404(live):
    c = client(live)
    for kw in (dict(temperature=5), dict(max_tokens=0), dict(top_p=0), dict(n=0), dict(n=129), dict(max_tokens=10_000), dict(stop=["a"] * 5)):
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="ad0", prompt="hi", **{"max_tokens": 4, **kw})
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="ad0", messages=[])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="ad0", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-adapter", prompt="hi")
    bad = [dict(seed=10**20), dict(top_k=-5), dict(min_tokens=3), dict(logprobs=True), dict(logprobs=21), dict(repetition_penalty=0),
           dict(presence_penalty=2.5), dict(logit_bias={"a": 1}), dict(logit_bias={"5": 101}), dict(suffix="x"),
           dict(max_tokens=True), dict(max_tokens="5"), dict(stream="yes"), dict(prompt="\ud800"), dict(prompt=[1, 10**6]),
           dict(prompt=["hi"] * 300), dict(response_format={"type": "json_object"}), dict(best_of=0), dict(n=0),
           dict(stream_options={"include_usage": True}), dict(stream=True, stream_options={"include_usage": "no"})]
    for kw in bad:  # every one a 400 with OpenAI's error object, none a 500 or silently ignored
        status, body = post_json(live, "/v1/completions", {"model": "ad0", "prompt": "hi", "max_tokens": 2, **kw})
        assert status == 400 and body["error"]["message"], kw
    user = {"role": "user", "content": "hi"}
    for kw in (dict(max_tokens=0, max_completion_tokens=3), dict(messages=[{"role": "user"}]), dict(messages=[{"role": "user", "content": "\ud800"}])):
        status, body = post_json(live, "/v1/chat/completions", {"model": "ad0", "messages": [user], **kw})
        assert status == 400 and body["error"]["message"], kw
    assert body["error"]["param"] == "messages"
    for kw in (dict(echo=True), dict(tool_choice="required"), dict(tool_choice={"type": "function", "function": {"name": "f"}}),
               dict(functions=[{"name": "f"}]), dict(function_call={"name": "f"})):  # refused, not ignored
        status, body = post_json(live, "/v1/chat/completions", {"model": "ad0", "messages": [user], **kw})
        assert status == 400 and body["error"]["message"] == f"{next(iter(kw))} is not supported by this server", kw
    status, _ = post_json(live, "/v1/chat/completions", {"model": "ad0", "messages": [user], "max_tokens": 1, "tool_choice": "none",
                                                         "function_call": "auto", "functions": [], "echo": False})
    assert status == 200
    status, body = post_json(live, "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    for path, method, code in [("/v1/adapters/ad0", "GET", 404), ("/v1/models/nope", "GET", 404), ("/v1/completions", "GET", 405)]:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(urllib.request.Request(live.url + path, method=method))
        assert e.value.code == code and json.loads(e.value.read())["error"]["code"] == code
    head = urllib.request.urlopen(urllib.request.Request(live.url + "/health", method="HEAD"))
    assert head.status == 200 and head.read() == b""  # a load balancer's probe


def test_vllm_fields_not_implemented_are_refused_and_unknown_ones_ignored(live):
    prompt = {"model": "ad0", "prompt": "hi", "max_tokens": 2}
    for kw in (dict(guided_json={"type": "object"}), dict(guided_choice=["a", "b"]), dict(use_beam_search=True),
               dict(skip_special_tokens=False), dict(bad_words=["x"]), dict(prompt_logprobs=1)):
        status, body = post_json(live, "/v1/completions", {**prompt, **kw})
        assert status == 400 and body["error"]["message"] == f"{next(iter(kw))} is not supported by this server", kw
        assert body["error"]["param"] == next(iter(kw))
    status, body = post_json(live, "/v1/chat/completions", {"model": "ad0", "messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2, "continue_final_message": True})
    assert status == 400 and "continue_final_message" in body["error"]["message"]
    for kw in (dict(skip_special_tokens=True, add_generation_prompt=True, guided_json=None, use_beam_search=False, length_penalty=1.0,
                    bad_words=[], priority=0), dict(some_future_field=1),
               dict(min_p=0.1, stop_token_ids=[5], include_stop_str_in_output=True)):  # vLLM's defaults; unknown; implemented
        status, body = post_json(live, "/v1/completions", {**prompt, **kw})
        assert status == 200, (kw, body)
    status, body = post_json(live, "/v1/completions", {**prompt, "min_p": 1.5})
    assert status == 400 and body["error"]["param"] == "min_p"


def post_json(live, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(live.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_token_id_prompts_and_null_fields(live, ref):
    """A prompt of token IDs answers like its text; null means a field's default (OpenAI's API)."""
    ids = live.state.engine.tok("Hello there", add_special_tokens=False)["input_ids"]
    by_text = post_json(live, "/v1/completions", {"model": "ad2", "prompt": "Hello there", "max_tokens": 5, "temperature": 0})[1]
    status, by_ids = post_json(live, "/v1/completions", {"model": "ad2", "prompt": [ids, ids], "max_tokens": 5, "temperature": 0,
                                                          "n": None, "stream": None, "echo": None, "ignore_eos": None, "seed": 2**64 - 1})
    assert status == 200 and [c["text"] for c in by_ids["choices"]] == [by_text["choices"][0]["text"]] * 2


def test_a_client_that_goes_away_is_cancelled_while_tokens_still_come(live):
    """A non-streaming request whose client disconnects stops within about a second, even
    though its tokens keep coming (each engine step is slowed down to 20 ms here)."""
    import socket

    engine, forward = live.state.engine, live.state.engine.model.forward
    engine.model.forward = lambda *a, **k: (time.sleep(0.02), forward(*a, **k))[1]
    try:
        body = json.dumps({"model": "ad0", "prompt": "hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 5
        while not engine.running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running
        sock.close()
        deadline = time.time() + 2.5  # 200 tokens would take 4 s or more
        while engine.busy and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.busy
    finally:
        del engine.model.forward


def test_64_concurrent_requests_across_10_adapters(live, ref):
    jobs = [(f"ad{i % 10}" if i % 11 else "tiny", PROMPTS[i % len(PROMPTS)], 4 + i % 9) for i in range(64)]

    async def run():
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        calls = [c.chat.completions.create(model=m, messages=[{"role": "user", "content": p}], max_tokens=n, temperature=0) for m, p, n in jobs]
        return await asyncio.gather(*calls)

    outs = asyncio.run(run())
    assert [o.choices[0].message.content for o in outs] == [ref(None if m == "tiny" else m, p, n, chat=True) for m, p, n in jobs]
    metrics = urllib.request.urlopen(live.url + "/metrics").read().decode()
    value = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    # concurrent first requests for an adapter share one read: at most one miss per adapter (10 + "extra")
    assert value['lorq_adapter_requests_total{model="ad3"}'] >= 6 and value["lorq_adapter_cache_misses_total"] <= 11
    assert value["lorq_adapter_cache_hits_total"] >= 48
    assert value["lorq_queue_depth"] == 0 and value["lorq_running_sequences"] == 0 and value["lorq_preemptions_total"] == 0
    assert "lorq_request_latency_seconds_bucket" in metrics and 'lorq_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics


def test_full_queue_answers_429_and_drops_nothing(tiny_model_dir, many_adapters):
    server = start_server(tiny_model_dir, many_adapters, max_batch=1, max_queue=2)
    try:
        async def run():
            c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
            calls = [c.completions.create(model=f"ad{i % 10}", prompt=PROMPTS[0], max_tokens=30, temperature=0) for i in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)

        outs = asyncio.run(run())
        ok = [o for o in outs if not isinstance(o, Exception)]
        refused = [o for o in outs if isinstance(o, openai.RateLimitError)]
        assert len(ok) + len(refused) == 12 and refused and len(ok) >= 3
        assert all(o.usage.completion_tokens == 30 for o in ok)
    finally:
        server.close()


def test_api_key(tiny_model_dir, many_adapters):
    server = start_server(tiny_model_dir, many_adapters, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(server, api_key="wrong").models.list()
        with pytest.raises(urllib.error.HTTPError) as e:  # no key at all
            urllib.request.urlopen(server.url + "/v1/models")
        assert e.value.code == 401
        assert client(server, api_key="s3cret").models.list().data
        lower = urllib.request.Request(server.url + "/v1/models", headers={"Authorization": "bearer s3cret"})
        assert urllib.request.urlopen(lower).status == 200  # the scheme is case-insensitive (RFC 7235)
        req = urllib.request.Request(server.url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:  # the key is checked before the body
            urllib.request.urlopen(req)
        assert e.value.code == 401
        assert urllib.request.urlopen(server.url + "/health").status == 200
    finally:
        server.close()


@contextmanager
def cli_server(model_dir, adapters, *extra):
    """`lorq serve` in a process of its own, once it answers /health: (process, base URL)."""
    sock = free_port()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "lorq", "serve", "--model", str(model_dir), "--adapters", str(adapters),
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(url + "/health")
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def stopped_cleanly(proc) -> None:
    assert proc.wait(60) == 0
    log = proc.stdout.read()
    assert "lorq: server stopped" in log and "Traceback" not in log


def test_cli_serve_finishes_in_flight_requests_on_sigterm(tiny_model_dir, many_adapters):
    with cli_server(tiny_model_dir, many_adapters) as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = c.completions.create(model="ad1", prompt=PROMPTS[0], max_tokens=150, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length" and first.choices[0].finish_reason is None
        stopped_cleanly(proc)


def test_a_second_ctrl_c_quits_at_once_without_an_abort(tiny_model_dir, many_adapters):
    """The first SIGINT drains; a second one quits now (uvicorn's force exit) with 128 + SIGINT,
    not the SIGABRT of tearing torch down under the running engine thread."""
    with cli_server(tiny_model_dir, many_adapters, "--max-batch", "1") as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        long = dict(max_tokens=240, temperature=0, extra_body={"ignore_eos": True})
        stream = c.completions.create(model="ad1", prompt=PROMPTS[0], stream=True, **long)
        next(iter(stream))
        for p in PROMPTS[1:] * 2:  # queued behind it (--max-batch 1): the drain outlasts the second signal
            threading.Thread(target=catch, args=(lambda p=p: c.completions.create(model="ad2", prompt=p, **long),), daemon=True).start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 128 + signal.SIGINT
        log = proc.stdout.read()
        assert "lorq: forced exit" in log and "terminate called" not in log and "Traceback" not in log, log


def test_requests_unfinished_at_the_shutdown_deadline_get_a_503(tiny_model_dir, many_adapters):
    """`--shutdown-timeout 0`: SIGTERM ends what is queued or running with a 503 at once."""
    with cli_server(tiny_model_dir, many_adapters, "--shutdown-timeout", "0", "--max-batch", "1") as (proc, url):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        stream = c.completions.create(model="ad1", prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
        events = iter(stream)
        next(events)
        answers = []  # two more requests wait behind the running one (--max-batch 1)
        senders = [threading.Thread(target=lambda p=p: answers.append(catch(lambda: c.completions.create(model="ad2", prompt=p, max_tokens=200, temperature=0))))
                   for p in PROMPTS[1:3]]
        for t in senders:
            t.start()
        deadline = time.time() + 30
        while "lorq_queue_depth 2.0" not in urllib.request.urlopen(url + "/metrics").read().decode():
            assert time.time() < deadline, "the requests never queued"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            list(events)  # the stream may have finished first; if not, it ends with the error event
        except openai.APIError as e:
            assert "shut down before this request finished" in str(e)
        for t in senders:
            t.join(30)
        assert len(answers) == 2
        for a in answers:
            assert isinstance(a, openai.InternalServerError) and a.status_code == 503 and "shut down before this request finished" in str(a)
        stopped_cleanly(proc)


def test_expiry_ends_running_and_queued_requests_and_refuses_new_ones(tiny_model_dir, many_adapters):
    server = start_server(tiny_model_dir, many_adapters, max_batch=1)
    engine = server.state.engine
    forward = engine.model.forward

    def slow(*a, **k):  # steps long enough for the requests to be in flight when the deadline passes
        time.sleep(0.05)
        return forward(*a, **k)

    engine.model.forward = slow
    try:
        c = client(server)
        stream = iter(c.chat.completions.create(model="ad1", messages=[{"role": "user", "content": "hi"}], max_tokens=100, temperature=0, stream=True))
        next(stream)
        answers = []
        sender = threading.Thread(target=lambda: answers.append(catch(lambda: c.completions.create(model="ad2", prompt="hi", max_tokens=100))))
        sender.start()
        while not engine.waiting:
            time.sleep(0.01)
        engine.expire()
        with pytest.raises(openai.APIError, match="shut down before this request finished"):
            list(stream)
        sender.join(30)
        assert isinstance(answers[0], openai.InternalServerError) and answers[0].status_code == 503
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            c.completions.create(model="ad2", prompt="hi", max_tokens=2)
        assert not engine.busy and not server.state.store.in_use  # every adapter released once
    finally:
        engine.model.forward = forward
        server.close()


def catch(call):
    try:
        return call()
    except Exception as e:
        return e


def test_a_failing_step_is_a_500_and_an_error_event_in_a_stream(live):
    def broken(*a, **k):
        raise RuntimeError("boom")

    c = client(live)
    live.state.engine.model.forward = broken
    try:
        with pytest.raises(openai.InternalServerError):
            c.completions.create(model="ad0", prompt="hi", max_tokens=3)
        with pytest.raises(openai.APIError, match="generation failed"):
            list(c.chat.completions.create(model="ad0", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    finally:
        del live.state.engine.model.forward
    assert c.completions.create(model="ad0", prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_a_request_cancelled_while_its_adapter_is_read_releases_it(live):
    store = live.state.store
    store.register("slow", "ad9")
    store.cache.pop("slow")  # the next acquire reads it from disk
    read = store.read

    def slow_read(name, path):
        time.sleep(0.5)
        return read(name, path)

    async def cancel_midway():
        store.read = slow_read
        task = asyncio.ensure_future(live.state.adapter_for("slow"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # the read finishes in its thread and is released

    try:
        asyncio.run(cancel_midway())
    finally:
        store.read = read
    assert "slow" in store.cache and not store.in_use.get("slow")
    store.unregister("slow")


def test_an_empty_api_key_is_refused_at_startup():
    from lorq.errors import LorqError
    from lorq.serve.server import ServeConfig

    with pytest.raises(LorqError, match="must not be empty"):
        ServeConfig(api_key="").validate()


def test_vanishing_temperature_and_top_p_still_sample(live):
    """Below ~1e-45 they are 0 in fp32: the limit (the most likely token) is the answer, not a 500."""
    for kw in (dict(temperature=5e-324), dict(temperature=1e-46), dict(top_p=1e-300), dict(top_p=5e-324, temperature=0.7)):
        status, body = post_json(live, "/v1/completions", {"model": "ad0", "prompt": "hi", "max_tokens": 3, "seed": 1, **kw})
        assert status == 200 and body["usage"]["completion_tokens"] == 3, (kw, body)
    greedy = post_json(live, "/v1/completions", {"model": "ad0", "prompt": "hi", "max_tokens": 3, "temperature": 0})[1]
    tiny = post_json(live, "/v1/completions", {"model": "ad0", "prompt": "hi", "max_tokens": 3, "temperature": 1e-300})[1]
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_chunked_bodies_are_held_to_the_size_limit(live):
    import http.client

    from lorq.serve.server import MAX_BODY_BYTES

    host, port = live.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")  # no Content-Length to refuse up front
    conn.endheaders()
    chunk = b"x" * 2**20
    try:
        for _ in range(MAX_BODY_BYTES // len(chunk) + 1):
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
    except OSError:  # the server may answer and close before the last chunk
        pass
    response = conn.getresponse()
    assert response.status == 413 and "larger than" in json.loads(response.read())["error"]["message"]
    conn.close()
    def refused() -> float:
        metrics = urllib.request.urlopen(live.url + "/metrics").read().decode()
        label = 'lorq_requests_total{endpoint="/v1/completions",status="413"} '
        return next((float(line.removeprefix(label)) for line in metrics.splitlines() if line.startswith(label)), 0.0)

    before = refused()
    conn = http.client.HTTPConnection(host, int(port), timeout=60)  # refused on its Content-Length, before routing
    conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json", "Content-Length": str(MAX_BODY_BYTES + 1)})
    assert conn.getresponse().status == 413
    conn.close()
    assert refused() == before + 1  # counted under its endpoint, not "unmatched"
    assert client(live).completions.create(model="ad0", prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_adapters_with_non_finite_weights_or_scaling_are_refused(live, many_adapters):
    from safetensors.torch import load_file, save_file

    c = client(live)
    post = lambda body: c.post("/load_lora_adapter", body=body, cast_to=str)  # noqa: E731
    root = live.state.store.root
    for name, edit in [("nan_w", "weights"), ("big_alpha", "alpha")]:
        shutil.copytree(many_adapters / "ad1", root / name)
        if edit == "weights":
            tensors = load_file(root / name / "adapter_model.safetensors")
            first = next(iter(tensors))
            tensors[first][0, 0] = float("nan")
            save_file(tensors, root / name / "adapter_model.safetensors")
        else:
            config = json.loads((root / name / "adapter_config.json").read_text())
            (root / name / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e300}))  # finite, but not in fp32
        with pytest.raises(openai.BadRequestError) as e:
            post({"lora_name": name})
        message = e.value.body["message"]
        assert ("NaN" in message or "overflow" in message) and str(root) not in message, message
    for body in ({"lora_name": "x4\n", "lora_path": "ad1"}, {"lora_name": "x5", "lora_path": ""}):
        with pytest.raises(openai.BadRequestError) as e:
            post(body)
        assert e.value.body["param"] == ("lora_name" if "\n" in body["lora_name"] else "lora_path")
