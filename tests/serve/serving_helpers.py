import socket
import threading
import time

import pytest
import torch

from conftest import make_adapter


@pytest.fixture(scope="session")
def many_adapters(tiny_model_dir, tmp_path_factory):
    """An adapter root with 10 adapters of ranks 2..16 on different layer sets."""
    root = tmp_path_factory.mktemp("served")
    targets = [None, [r"self_attn\.(q|v)_proj"], [r"mlp\."]]
    for i in range(10):
        extra = {"targets": targets[i % 3]} if targets[i % 3] else {}
        make_adapter(tiny_model_dir, root / f"ad{i}", 10 + i, rank=[2, 4, 8, 16][i % 4], alpha=8, rslora=i % 5 == 0, **extra)
    return root


def free_port() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 with a free port."""

    def __init__(self, server, **uvicorn_kw):
        import uvicorn

        from lorq.serve.server import create_app

        self.state = server
        self.sock = free_port()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(server), log_level="warning", **uvicorn_kw)
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uv.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(30)
        self.sock.close()


def start_server(model_dir, adapter_root, api_key=None, **cfg):
    from lorq.models.loading import load_model
    from lorq.serve.engine import EngineConfig
    from lorq.serve.server import ServeConfig, build_server

    torch.manual_seed(0)
    model, tok, _ = load_model(str(model_dir))
    scfg = ServeConfig(adapters=str(adapter_root) if adapter_root else None, api_key=api_key,
                       engine=EngineConfig(**{k: v for k, v in cfg.items() if k in ("max_batch", "max_batch_tokens", "max_queue")}),
                       adapter_cache_mb=cfg.get("adapter_cache_mb", 2048.0))
    return LiveServer(build_server(model, tok, "tiny", scfg))


class References:
    """Offline greedy outputs of `lorq generate` (transformers' generate with one adapter)."""

    def __init__(self, model_dir, root):
        self.model_dir, self.root, self.models, self.tok = model_dir, root, {}, None

    def __call__(self, adapter: str | None, prompt: str, max_tokens: int, chat: bool) -> str:
        from lorq.eval.generate import generate_text
        from lorq.jobs import load_for_inference
        from lorq.quant.base import no_quant

        if adapter not in self.models:
            model, self.tok, _ = load_for_inference(str(self.model_dir), no_quant(), str(self.root / adapter) if adapter else None)
            self.models[adapter] = model
        return generate_text(self.models[adapter], self.tok, prompt, max_tokens, chat=chat)


PROMPTS = ["What does the with statement do?", "List three uses of decorators.", "hi", "Explain generators", "x = 1; print(x)"]
