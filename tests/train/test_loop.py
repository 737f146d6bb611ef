import json

import pytest
import torch
from safetensors.torch import load_file

from lorq.adapters import LoRAConfig, add_adapters
from lorq.quant import DECODER_LINEARS, FormatConfig, quantize_model
from lorq.train.checkpoint import latest_checkpoint
from lorq.train.data import Blocks
from lorq.train.loop import TrainConfig, batch_indices, lr_at, train


def toy_blocks(n=24, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, (n, T), generator=g)
    x[:, 1::2] = (x[:, 0::2] + 1) % 128  # learnable structure
    return Blocks(x, x.clone())


def fresh_model():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    quantize_model(model, [(DECODER_LINEARS, FormatConfig())], progress=False)
    add_adapters(model, LoRAConfig(rank=4, dropout=0.1))
    return model


def cfg(**kw):
    base = dict(steps=8, batch_size=2, grad_accum=2, lr=5e-3, warmup_steps=2, eval_every=4, save_every=2, eval_blocks=4, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_schedule_and_batches_are_pure():
    c = cfg(steps=10, warmup_steps=2, lr=1.0)
    assert lr_at(0, c) == 0.5 and lr_at(1, c) == 1.0 and lr_at(9, c) < 0.05
    a = batch_indices(3, 10, 4, seed=1)
    assert torch.equal(a, batch_indices(3, 10, 4, seed=1))
    epoch = torch.cat([batch_indices(s, 10, 5, seed=1) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))


def test_training_lowers_loss_and_writes_metrics(tmp_path):
    model = fresh_model()
    data = toy_blocks()
    out = train(model, data, data, cfg(steps=12), tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len([l for l in lines if '"loss"' in l]) == 12
    import json

    first = json.loads(lines[0])["loss"]
    assert out["loss"] < first
    assert latest_checkpoint(tmp_path).name == "step-000012"


def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    data = toy_blocks()
    ref = fresh_model()
    train(ref, data, data, cfg(), tmp_path / "ref", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step):
        if step == 5:
            raise Killed

    model = fresh_model()
    with pytest.raises(Killed):
        train(model, data, data, cfg(), tmp_path / "run", on_step=kill_at_5, progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    resumed = fresh_model()  # a new process: fresh model, state only from disk
    train(resumed, data, data, cfg(resume=True), tmp_path / "run", progress=False)
    a, b = adapter_tensors(ref), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert all(torch.equal(final[k], b[k]) for k in b)
    steps = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [json.loads(l)["step"] for l in steps] == list(range(1, 9))  # no duplicates after resume


def test_interrupted_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    from lorq.train import checkpoint as ck

    data = toy_blocks()
    model = fresh_model()
    train(model, data, data, cfg(steps=2), tmp_path, progress=False)
    real_save = ck.save_safetensors

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_safetensors", crash)
    with pytest.raises(KeyboardInterrupt):
        train(model, data, data, cfg(steps=4, resume=True), tmp_path, progress=False)
    monkeypatch.setattr(ck, "save_safetensors", real_save)
    assert latest_checkpoint(tmp_path).name == "step-000002"
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_memory_savers_train_the_same_adapter(tmp_path):
    """Chunked cross-entropy, activation checkpointing and lean activations change what is
    stored, not the math; the lean forms are gone after training."""
    results = {}
    savers = {"full": dict(loss_chunk=0, lean_activations=False), "chunked": dict(loss_chunk=5), "lean": dict(loss_chunk=0),
              "checkpointed": dict(loss_chunk=0, grad_checkpointing=True)}
    for name, kw in savers.items():
        model = fresh_model()
        final = train(model, toy_blocks(), toy_blocks(8, seed=1), cfg(steps=3, eval_every=3, save_every=3, **kw), tmp_path / name, progress=False)
        results[name] = (final, adapter_tensors(model))
        assert final["peak_rss_mb"] > 0
        assert not any("forward" in vars(m) for m in model.modules())
    for name in ("chunked", "lean", "checkpointed"):
        assert results[name][0]["loss"] == pytest.approx(results["full"][0]["loss"], rel=1e-5), name
        for k, t in results["full"][1].items():
            assert torch.allclose(results[name][1][k], t, atol=1e-5), (name, k)


def test_batch_order_takes_any_64_bit_seed_and_keeps_the_usual_ones():
    import torch

    from lorq.train.loop import batch_indices

    for seed in (2**62, -(2**62), 200_000_000_000_000):  # seed * 100003 passes 64 bits
        assert batch_indices(3, 10, 4, seed).shape == (4,)
    assert torch.equal(batch_indices(0, 10, 4, 7)[:4], torch.randperm(10, generator=torch.Generator().manual_seed(7 * 100003))[:4])


def test_training_runs_each_block_with_its_document_positions(tmp_path):
    """Blocks packed as documents train with their restarting position ids (transformers then
    masks the documents apart); stream blocks with none."""
    model = fresh_model()
    data = toy_blocks(n=8)
    pos = torch.arange(16).repeat(8, 1)
    pos[:, 9:] -= 9  # a second document from column 9 on
    seen = []
    decoder = model.get_decoder()
    forward = decoder.forward

    def spy(*args, **kw):
        if torch.is_grad_enabled():  # training, not validation
            seen.append(kw.get("position_ids"))
        return forward(*args, **kw)

    decoder.forward = spy
    train(model, Blocks(data.input_ids, data.labels, pos), data, cfg(steps=2, grad_accum=1, save_every=10), tmp_path / "docs", progress=False)
    assert len(seen) == 2 and all(torch.equal(p, pos[:2]) for p in seen)
    seen.clear()
    train(model, data, data, cfg(steps=2, grad_accum=1, save_every=10), tmp_path / "stream", progress=False)
    assert seen == [None, None]


def test_tight_heap_is_set_before_the_peak_is_reset(tmp_path, monkeypatch):
    """(The allocator itself: tests/eval/test_memory.py, in a process of its own, since the
    setting lasts for the process.)"""
    import importlib

    loop = importlib.import_module("lorq.train.loop")
    calls = []
    monkeypatch.setattr(loop, "tight_heap", lambda: calls.append("tight") or True)
    monkeypatch.setattr(loop, "reset_peak", lambda: calls.append("reset"))
    for on in (False, True):
        train(fresh_model(), toy_blocks(), toy_blocks(8, seed=1), cfg(steps=1, tight_heap=on), tmp_path / str(on), progress=False)
    assert calls == ["reset", "tight", "reset"]


def test_the_heap_is_trimmed_between_each_forward_and_its_backward(tmp_path, monkeypatch):
    """(What a trim gives back: tests/eval/test_memory.py.)"""
    import importlib

    loop = importlib.import_module("lorq.train.loop")
    for on in (True, False):
        events = []
        monkeypatch.setattr(loop, "release_freed_memory", lambda: events.append("trim"))
        model = fresh_model()
        decoder, forward = model.model, model.model.forward

        def spy(*a, **kw):
            out = forward(*a, **kw)
            if decoder.training:  # not validation
                events.append("forward")
                out.last_hidden_state.register_hook(lambda g: events.append("backward"))  # the first gradient of backward
            return out

        decoder.forward = spy
        train(model, toy_blocks(), toy_blocks(8, seed=1), cfg(steps=2, grad_accum=2, trim_heap=on), tmp_path / str(on), progress=False)
        micro = ["forward", "trim", "backward"] if on else ["forward", "backward"]
        assert events == ["trim"] + micro * 4  # the first: before training's peak is reset
