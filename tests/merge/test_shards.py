"""The streaming safetensors writer against safetensors' own reader and transformers' loader."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from lorq.errors import LorqError
from lorq.io import TensorSpec
from lorq.merge.shards import CheckpointReader, plan_shards, write_safetensors, write_sharded


def specs_of(tensors):
    return [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4, dtype=torch.bfloat16),
        "d": torch.tensor(3.5, dtype=torch.float16), "e": torch.randint(0, 255, (9,), dtype=torch.uint8), "f": torch.zeros(0, 3),
    }
    write_safetensors(tmp_path / "x.safetensors", specs_of(tensors), lambda s: tensors[s.name])
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


def test_a_producer_that_breaks_its_plan_is_caught(tmp_path):
    with pytest.raises(RuntimeError, match="planned"):
        write_safetensors(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))], lambda s: torch.zeros(3))


def test_plan_shards_keeps_order_and_size():
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 100, 5, 5, 5])]
    shards = plan_shards(specs, max_bytes=80)
    assert [s.name for group in shards for s in group] == [s.name for s in specs]
    assert all(sum(s.nbytes for s in g) <= 80 or len(g) == 1 for g in shards)
    assert [len(g) for g in shards] == [2, 1, 3]


def test_sharded_checkpoint_loads_in_transformers(tiny_llama, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_llama.state_dict().items()}
    names = write_sharded(tmp_path, specs_of(state), lambda s: state[s.name], max_bytes=20_000)
    assert len(names) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    tiny_llama.config.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(x).logits, tiny_llama(x).logits)
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.names()) == sorted(state) and torch.equal(reader.get("lm_head.weight"), state["lm_head.weight"])


def test_reader_errors(tmp_path):
    with pytest.raises(LorqError, match="has no model.safetensors"):
        CheckpointReader(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(LorqError, match="not a readable safetensors"):
        CheckpointReader(tmp_path)
    spec = TensorSpec("w", torch.float32, (4, 4))
    write_safetensors(tmp_path / "model.safetensors", [spec], lambda s: torch.ones(4, 4))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])  # truncated: the tensor runs past the end
    with pytest.raises(LorqError, match="outside the file"):
        CheckpointReader(tmp_path)
