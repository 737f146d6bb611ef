"""`lorq serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

The request's `model` field picks the adapter (or the base model by its served name). Errors
are OpenAI's error objects: 400 invalid request, 401 bad or missing API key, 404 unknown
model or adapter, 429 queue full. /metrics and /health need no key (scrapers and probes).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import LorqError
from ..eval.generate import chat_text, encode_prompt
from ..models.loading import DEFAULT_MODEL, DEVICE_HELP, MODEL_HELP, Device
from ..options import NON_NEGATIVE, POSITIVE, check_ranges, opt
from ..quant import FormatConfig
from ..quant.base import no_quant
from ..train.precision import INFERENCE_PRECISION_HELP, Precision
from .adapter_cache import NAME, NAME_RULE, AdapterNotFound, AdapterStore, InvalidAdapterPath
from .engine import Engine, EngineConfig, QueueFull, SamplingParams, Sequence, ShuttingDown
from .metrics import Metrics
from .protocol import (
    APIError, ChatRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, bad_request, chat_chunk, chat_logprobs, chat_object,
    completion_choice, completion_logprobs, completion_object, new_id, usage,
)
from .logprobs import LogprobCursor, TokenText


@dataclass
class ServeConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP)
    quant: FormatConfig = field(default_factory=no_quant)
    adapters: str | None = opt(None, "adapter root: each subdirectory with an adapter_config.json is served under its name; load_lora_adapter loads only from here")
    served_name: str | None = opt(None, "the base model's id in the API; unset: the model directory's name (a .gguf file's without .gguf)")
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1; unset: $LORQ_API_KEY if set, else no key")
    host: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(8000, "port to listen on")
    device: Device = opt(Device.AUTO, DEVICE_HELP)
    precision: Precision = opt(Precision.AUTO, INFERENCE_PRECISION_HELP)
    adapter_cache_mb: float = opt(2048.0, "memory budget of the adapter weight cache (LRU; adapters in use are kept)")
    shutdown_timeout: float = opt(60.0, "seconds in-flight requests get to finish after SIGINT/SIGTERM; unfinished ones then get a 503 (an error event in a stream)")
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> "ServeConfig":
        self.engine.validate()
        if not 0 < self.port < 65536:
            raise LorqError(f"port must be in 1..65535, got {self.port}")
        check_ranges(self, {"adapter_cache_mb": POSITIVE, "shutdown_timeout": NON_NEGATIVE})
        if self.adapter_cache_mb * 2**20 < 1:
            raise LorqError(f"adapter-cache-mb {self.adapter_cache_mb} is less than one byte")
        for name in ("adapters", "served_name"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise LorqError(f"--{name.replace('_', '-')} is empty; leave it out for the default")
        if self.adapters and not Path(self.adapters).is_dir():
            raise LorqError(f"adapter root {self.adapters} is not a directory")
        if self.api_key == "":
            raise LorqError("--api-key must not be empty (leave it out to serve without a key)")
        if self.api_key is not None and not (self.api_key.isascii() and self.api_key.isprintable()):
            raise LorqError("--api-key must be printable ASCII (it travels in an HTTP header)")
        return self


class Server:
    """The state behind the routes: engine, adapter store, metrics, the base model's name."""

    def __init__(self, engine: Engine, store: AdapterStore, base_name: str, api_key: str | None = None):
        self.engine, self.store, self.base_name, self.api_key = engine, store, base_name, api_key
        self.metrics = Metrics(engine, store)
        self.token_text = TokenText(engine.tok)  # shared: its cache of token bytes grows with use
        self.created = int(time.time())
        engine.on_finish = self.sequence_done

    def sequence_done(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.store.release(seq.adapter.name)
        self.metrics.sequence_done(seq, time.perf_counter())

    def key_ok(self, request: Request) -> bool:
        if self.api_key is None or not request.url.path.startswith("/v1/"):
            return True
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.encode(), self.api_key.encode())  # the scheme is case-insensitive (RFC 7235)

    async def adapter_for(self, model: str):
        """None for the base model, else the adapter's weights (marked in use)."""
        if model == self.base_name:
            return None
        reading = asyncio.ensure_future(run_in_threadpool(self.store.acquire, model))
        try:
            return await asyncio.shield(reading)  # a cancelled request must still release what the read acquires
        except asyncio.CancelledError:
            reading.add_done_callback(lambda f: self.store.release(model) if not f.cancelled() and f.exception() is None else None)
            raise
        except AdapterNotFound as e:
            raise APIError(404, str(e), "not_found_error", "model")
        except Exception as e:  # whatever is wrong in the adapter's files is the request's problem, not a 500
            raise self.unreadable(model, e, "model")

    def unreadable(self, name: str, e: Exception, param: str) -> APIError:
        """400 for an adapter that cannot be read; paths in the message are relative to the
        adapter root (a client has no business knowing the server's directories)."""
        text, root = describe(e), self.store.root
        if root is not None:
            text = text.replace(f"{root}{os.sep}", "").replace(str(root), "the adapter root")
        return APIError(400, f"adapter {name!r} cannot be loaded: {text}", param=param)

    async def start(self, model: str, prompts: list[list[int]], params: SamplingParams, arrival: float, n: int = 1):
        """Submit n sequences per prompt (choice i·n + j is prompt i's j-th); events arrive on the
        returned queue as (choice index, delta, reason)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seqs = []
        if len(prompts) * n > self.engine.cfg.max_queue:  # could never be queued at once: not a "retry later"
            raise APIError(400, f"{len(prompts)} prompts x n = {n} in one request, more than the queue holds ({self.engine.cfg.max_queue})",
                           param="n" if n > 1 else "prompt")
        try:
            for i, prompt in enumerate(p for p in prompts for _ in range(n)):
                adapter = await self.adapter_for(model)

                def on_event(delta, reason, i=i):
                    loop.call_soon_threadsafe(events.put_nowait, (i, delta, reason))

                try:
                    seqs.append(self.engine.submit(prompt, adapter, choice_params(params, i % n), on_event, arrival=arrival))
                except BaseException:
                    if adapter is not None:
                        self.store.release(adapter.name)
                    raise
        except QueueFull as e:
            self.abort(seqs)
            raise APIError(429, str(e), "rate_limit_error")
        except ShuttingDown as e:
            self.abort(seqs)
            raise APIError(503, str(e), "service_unavailable")
        except LorqError as e:
            self.abort(seqs)
            raise bad_request(e)
        self.metrics.adapter_requests.labels(model).inc(len(prompts))
        return seqs, events

    def abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq.finish_reason is None:
                self.engine.abort(seq)

    async def collect(self, seqs: list[Sequence], events: asyncio.Queue, request: Request) -> list[tuple[str, str]]:
        texts, reasons, left = [""] * len(seqs), [""] * len(seqs), len(seqs)
        gone = asyncio.ensure_future(client_gone(request))
        try:
            while left:
                get = asyncio.ensure_future(events.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    raise APIError(499, "the client closed the connection")  # nobody waits for the answer: stop working on it
                i, delta, reason = get.result()
                texts[i] += delta
                if reason is not None:
                    reasons[i], left = reason, left - 1
        finally:
            gone.cancel()
            self.abort(seqs)  # the client went away before the end
        error = unfinished_error(reasons)
        if error is not None:
            raise error
        return list(zip(texts, reasons))


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th choice's sampling: a request's seed gives each choice its own stream (seed + j),
    so the n answers differ and each is reproducible."""
    out = SamplingParams(**vars(params))
    if j and out.seed is not None:
        out.seed = (out.seed + j) % 2**64
    return out


def request_usage(seqs: list[Sequence], n: int) -> dict:
    """Usage of a request's sequences, n per prompt: each prompt counted once, however many
    choices it has, and every generated token."""
    return usage(sum(len(s.prompt) for s in seqs[::n]), sum(len(s.generated) for s in seqs))


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected. (Starlette's is_disconnected() polls with an
    already-cancelled receive, which behind an http middleware never sees the disconnect.)"""
    while (await request.receive())["type"] != "http.disconnect":
        pass


SHUTDOWN_GRACE_S = 10  # after --shutdown-timeout: for the step in progress to end and the 503s to go out
MAX_BODY_BYTES = 16 * 2**20  # a request body larger than this is refused (413) before it is read
TOO_LARGE = f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB"


class BodyLimit:
    """Refuses (413) a body once more than MAX_BODY_BYTES of it have arrived: a chunked upload
    has no Content-Length to check before reading."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise StarletteHTTPException(413, TOO_LARGE)  # FastAPI passes it on to http_error
            return message

        await self.app(scope, counted, send)


class JSONBodies:
    """Reads every POST body as JSON, whatever its Content-Type: the API takes nothing else, and
    `curl -d` sends JSON labelled as a form."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def describe(e: Exception) -> str:
    """A one-line account of an exception for an error message."""
    text = str(e).splitlines()[0] if str(e) else ""
    return text if isinstance(e, LorqError) else f"{type(e).__name__}: {text}" if text else type(e).__name__


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def server_error() -> APIError:
    return APIError(500, "generation failed on the server (see its log)", "server_error")


def unfinished_error(reasons) -> APIError | None:
    """The error of a request one of whose sequences ended unfinished on the server's side."""
    if "error" in reasons:
        return server_error()
    if "shutdown" in reasons:
        return APIError(503, "the server shut down before this request finished (--shutdown-timeout)", "service_unavailable")
    return None


def endpoint(request: Request) -> str:
    """The route's path template (a bounded label set), or "unmatched"."""
    route = request.scope.get("route")
    if route is None:  # answered by a middleware, before routing ran
        route = next((r for r in request.app.router.routes if r.matches(request.scope)[0] is Match.FULL), None)
    return getattr(route, "path", "unmatched")


def encode(server: Server, prompt: str | list[int], chat: bool) -> list[int]:
    """Token IDs of a prompt: text through the tokenizer, or IDs checked against the vocabulary."""
    if not isinstance(prompt, str):
        vocab = server.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"token IDs in the prompt must be in 0..{vocab - 1}", param="prompt")
        return list(prompt)
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"the {'messages are' if chat else 'prompt is'} not valid Unicode text (an unpaired surrogate)",
                       param="messages" if chat else "prompt")
    return server.engine.tok(prompt, add_special_tokens=False)["input_ids"] if chat else encode_prompt(server.engine.tok, prompt, chat=False)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if server.engine.thread is None:
            server.engine.start()
        yield
        await run_in_threadpool(server.engine.stop)  # after uvicorn has let in-flight requests finish

    app = FastAPI(title="lorq", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    app.add_middleware(JSONBodies)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"invalid request: the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})").body(), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        return JSONResponse(APIError(400, f"invalid request: {where}: {first.get('msg')}", param=where).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # unknown routes, wrong methods, unreadable bodies
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}",
                   413: TOO_LARGE}
        error = APIError(e.status_code, message.get(e.status_code, f"invalid request: {e.detail}"), kind)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def count(request: Request, call_next):
        if not server.key_ok(request):  # before the body is read: a bad key is a 401, whatever the body
            error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", "authentication_error")
            server.metrics.requests.labels("unauthorized", "401").inc()
            return JSONResponse(error.body(), status_code=401)
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            error = APIError(413, TOO_LARGE)
            server.metrics.requests.labels(endpoint(request), "413").inc()
            return JSONResponse(error.body(), status_code=413)
        try:
            response = await call_next(request)
        except Exception:
            server.metrics.requests.labels(endpoint(request), "500").inc()
            raise
        server.metrics.requests.labels(endpoint(request), str(response.status_code)).inc()
        return response

    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)  # load balancers probe with either
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_entry(name: str) -> dict:
        parent = None if name == server.base_name else server.base_name
        return {"id": name, "object": "model", "created": server.created, "owned_by": "lorq", "root": name, "parent": parent}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_entry(n) for n in [server.base_name, *server.store.names]]}

    @app.get("/v1/models/{name:path}")  # adapter names may hold '/' (nested directories)
    async def model(name: str):
        if name != server.base_name and name not in server.store.names:
            raise APIError(404, f"the model {name!r} does not exist", "not_found_error", "model")
        return model_entry(name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        arrival = time.perf_counter()
        given = req.prompts()
        prompts = await run_in_threadpool(lambda: [encode(server, p, chat=False) for p in given])  # off the event loop
        params = req.sampling(req.max_tokens if req.max_tokens is not None else 16, prompt_logprobs=bool(req.echo))
        n = req.n or 1
        seqs, events = await server.start(req.model, prompts, params, arrival, n)
        rid = new_id("cmpl")
        echoes = [p if isinstance(p, str) else server.engine.tok.decode(p) for p in given for _ in range(n)] if req.echo else None
        if req.stream:
            return StreamingResponse(stream_completion(server, req, rid, seqs, events, echoes), media_type="text/event-stream")
        results = await server.collect(seqs, events, request)
        cursor = LogprobCursor(server.token_text, seqs)
        choices = []
        for i, (text, reason) in enumerate(results):
            lp = None
            if params.logprobs is not None:
                scored = cursor.take(i, prompt=bool(echoes))
                lp = completion_logprobs(scored, cursor.offsets(i, scored))
            choices.append(completion_choice(i, (echoes[i] if echoes else "") + text, reason, lp))
        return completion_object(rid, req.model, choices, request_usage(seqs, n))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        arrival = time.perf_counter()
        def template() -> list[int]:  # off the event loop: long histories take seconds to render
            try:
                text = chat_text(server.engine.tok, [m.as_template() for m in req.messages])
            except Exception as e:  # the template's own checks (e.g. roles out of order)
                raise APIError(400, f"the messages do not fit the chat template: {describe(e)}", param="messages")
            return encode(server, text, True)

        prompt = await run_in_threadpool(template)
        limit = next((v for v in (req.max_completion_tokens, req.max_tokens) if v is not None), max(server.engine.max_length - len(prompt), 1))
        params = req.sampling(limit)
        seqs, events = await server.start(req.model, [prompt], params, arrival, req.n or 1)
        rid = new_id("chatcmpl")
        if req.stream:
            return StreamingResponse(stream_chat(server, req, rid, seqs, events), media_type="text/event-stream")
        results = await server.collect(seqs, events, request)
        cursor = LogprobCursor(server.token_text, seqs)
        logprobs = [chat_logprobs(cursor.take(i)) for i in range(len(seqs))] if params.logprobs is not None else None
        return chat_object(rid, req.model, results, request_usage(seqs, len(seqs)), logprobs)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(req: LoadAdapterRequest):
        if req.lora_name == server.base_name:
            raise APIError(400, f"{req.lora_name!r} is the base model's name", param="lora_name")
        if not NAME.fullmatch(req.lora_name):
            raise APIError(400, f"invalid adapter name {req.lora_name!r}: {NAME_RULE}", param="lora_name")
        if req.lora_path is not None and not req.lora_path.strip():
            raise APIError(400, "lora_path is empty (leave it out to load the directory named lora_name)", param="lora_path")
        try:
            await run_in_threadpool(server.store.register, req.lora_name, req.lora_path)
        except AdapterNotFound as e:
            raise APIError(404, str(e), "not_found_error", "lora_path")
        except InvalidAdapterPath as e:  # quotes the client's path as sent: nothing to hide
            raise APIError(400, str(e), param="lora_path")
        except Exception as e:  # bad paths (too long, a symlink loop) and bad adapter files alike
            raise server.unreadable(req.lora_name, e, "lora_path")
        return PlainTextResponse(f"Success: adapter {req.lora_name!r} loaded")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(req: UnloadAdapterRequest):
        try:
            server.store.unregister(req.lora_name)
        except AdapterNotFound as e:
            raise APIError(404, str(e), "not_found_error", "lora_name")
        return PlainTextResponse(f"Success: adapter {req.lora_name!r} unloaded")

    return app


async def stream_completion(server: Server, req: CompletionRequest, rid: str, seqs, events, echoes: list[str] | None):
    left = len(seqs)
    cursor = LogprobCursor(server.token_text, seqs) if req.logprobs is not None else None
    echoed = [not echoes] * len(seqs)
    try:
        while left:
            i, delta, reason = await events.get()
            left -= reason is not None
            error = unfinished_error([reason])
            if error is not None:  # the openai client raises on an error event
                yield sse(error.body())
                yield "data: [DONE]\n\n"
                return
            prefix = "" if echoed[i] else echoes[i]  # the prompt comes with the choice's first chunk
            scored = cursor.take_event(i, prompt=not echoed[i]) if cursor is not None else []
            if delta or reason is not None or prefix:
                lp = completion_logprobs(scored, cursor.offsets(i, scored)) if cursor is not None else None
                echoed[i] = True
                yield sse(completion_object(rid, req.model, [completion_choice(i, prefix + delta, reason, lp)], None, chunk=True))
        if req.include_usage:
            yield sse(completion_object(rid, req.model, [], request_usage(seqs, req.n or 1), chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        server.abort(seqs)


async def stream_chat(server: Server, req: ChatRequest, rid: str, seqs, events):
    cursor = LogprobCursor(server.token_text, seqs) if req.logprob_count() is not None else None
    try:
        for i in range(len(seqs)):
            yield sse(chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, index=i))
        left = len(seqs)
        while left:
            i, delta, reason = await events.get()
            error = unfinished_error([reason])
            if error is not None:
                yield sse(error.body())
                yield "data: [DONE]\n\n"
                return
            scored = cursor.take_event(i) if cursor is not None else []
            if delta or scored:
                yield sse(chat_chunk(rid, req.model, {"content": delta}, index=i, logprobs=chat_logprobs(scored) if cursor is not None else None))
            if reason is not None:
                yield sse(chat_chunk(rid, req.model, {}, reason, index=i))
                left -= 1
        if req.include_usage:
            yield sse(chat_chunk(rid, req.model, None, use=request_usage(seqs, len(seqs))))
        yield "data: [DONE]\n\n"
    finally:
        server.abort(seqs)


def build_server(model, tok, name: str, cfg: ServeConfig) -> Server:
    """Engine + adapter store (adapters under --adapters registered, read on first use) + state."""
    engine = Engine(model, tok, cfg.engine)
    store = AdapterStore(cfg.adapters, engine.layers, int(cfg.adapter_cache_mb * 2**20), engine.dtype, engine.device)
    store.discover()
    if name in store.names:
        raise LorqError(f"an adapter directory is named {name!r} like the base model; pass --served-name")
    return Server(engine, store, name, cfg.api_key if cfg.api_key is not None else os.environ.get("LORQ_API_KEY") or None)


def check_address(host: str, port: int) -> None:
    """Bind (host, port) as uvicorn will, before the model is loaded: a busy port or an unknown
    host is one line at once, not uvicorn's log lines after a minute of loading."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(address)
    except OSError as e:  # socket.gaierror included
        raise LorqError(f"cannot listen on {host}:{port}: {e.strerror or e}")


def serve(server: Server, cfg: ServeConfig) -> None:
    import uvicorn

    dtype = str(server.engine.dtype).removeprefix("torch.")
    print(f"lorq: serving {server.base_name} ({dtype}) + {len(server.store.names)} adapters on http://{cfg.host}:{cfg.port}/v1 "
          f"(OpenAI-compatible; {'API key required' if server.api_key else 'no API key'})", flush=True)
    deadline = threading.Timer(cfg.shutdown_timeout, server.engine.expire)
    deadline.daemon = True

    class Graceful(uvicorn.Server):
        # uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which asyncio turns into a
        # traceback and a signal exit status; a drained, finished server ends normally instead
        def handle_exit(self, sig, frame):
            if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: quit now, as uvicorn would,
                # but without finalizing the interpreter under the engine thread's torch (SIGABRT)
                try:  # print can fail here (a write to stdout interrupted mid-way); the exit must not
                    print("lorq: forced exit, in-flight requests cut", flush=True)
                finally:
                    os._exit(128 + sig)
            super().handle_exit(sig, frame)
            self._captured_signals.clear()
            if not deadline.is_alive() and not deadline.finished.is_set():
                deadline.start()  # then unfinished requests get a 503 (an error event in a stream)

    # uvicorn's own deadline cancels the handlers (a bare 500, a cut stream): it comes later, once
    # the engine's current step has ended the expired requests properly
    config = uvicorn.Config(create_app(server), host=cfg.host, port=cfg.port, log_level="info",
                            timeout_graceful_shutdown=cfg.shutdown_timeout + SHUTDOWN_GRACE_S)
    Graceful(config).run()
    print("lorq: server stopped", flush=True)
