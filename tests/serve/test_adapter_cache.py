import os

import pytest
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config

from lorq.errors import LorqError
from lorq.models.loading import load_model
from lorq.serve import AdapterNotFound, AdapterStore
from lorq.serve.adapter_cache import resolve_under
from lorq.serve.multi_lora import wrap_for_serving
from serving_helpers import many_adapters  # noqa: F401  (fixture)


@pytest.fixture
def layers(tiny_model_dir):
    model, _, _ = load_model(str(tiny_model_dir))
    return wrap_for_serving(model, [r"layers\.\d+\."])[1]


def test_lru_eviction_within_the_budget(layers, many_adapters):
    sizes = {n: AdapterStore(many_adapters, layers, 1 << 30).read(n, many_adapters / n).nbytes for n in ("ad0", "ad4", "ad8")}
    assert sizes["ad4"] < sizes["ad8"]
    store = AdapterStore(many_adapters, layers, sizes["ad0"] + sizes["ad8"] + 1)  # not room for all three
    store.discover()
    for name in ("ad0", "ad4", "ad0", "ad8"):  # ad8 evicts the least recently used: ad4
        store.acquire(name)
        store.release(name)
    assert list(store.cache) == ["ad0", "ad8"]
    assert (store.stats.hits, store.stats.misses, store.stats.evictions) == (1, 3, 1)
    held = store.acquire("ad0")  # in use: never evicted
    store.acquire("ad4")
    store.release("ad4")
    assert "ad0" in store.cache and store.cache["ad0"] is held and "ad8" not in store.cache
    assert store.nbytes <= store.budget


def test_paths_must_stay_under_the_root(tmp_path, many_adapters):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(many_adapters / "ad1", root / "inside")  # a link into another tree leads outside
    (root / "real").mkdir()
    (root / "real" / "adapter_config.json").write_text("{}")
    assert resolve_under(root, "real") == (root / "real").resolve()
    for bad in ("../x", "/etc", str(many_adapters / "ad1"), "inside", "a/../../b", ""):
        with pytest.raises(LorqError):
            resolve_under(root, bad)
    with pytest.raises(AdapterNotFound):
        resolve_under(root, "missing")
    with pytest.raises(LorqError):
        resolve_under(root, "real\x00")
    (root / "linked").mkdir()  # a real directory whose weights file links outside the root
    (root / "linked" / "adapter_config.json").write_text("{}")
    os.symlink(many_adapters / "ad1" / "adapter_model.safetensors", root / "linked" / "adapter_model.safetensors")
    with pytest.raises(LorqError, match="outside"):
        resolve_under(root, "linked")


def test_register_unregister_and_bad_adapters(layers, many_adapters):
    store = AdapterStore(many_adapters, layers, 1 << 30)
    assert store.discover() == [f"ad{i}" for i in range(10)]
    with pytest.raises(LorqError, match="already loaded"):
        store.register("ad1")
    store.register("second", "ad1")
    assert store.acquire("second").modules.keys() == store.acquire("ad1").modules.keys()
    store.unregister("second")
    with pytest.raises(AdapterNotFound):
        store.acquire("second")
    with pytest.raises(AdapterNotFound):
        store.unregister("second")
    with pytest.raises(LorqError, match="invalid adapter name"):
        store.register("../ad1")
    with pytest.raises(LorqError, match="the first a letter or digit"):  # only allowed characters, but "..": a parent
        store.register("...")
    with pytest.raises(LorqError, match="more than the whole adapter cache"):
        AdapterStore(many_adapters, layers, 16).register("x", "ad2")
    other = wrap_for_serving(LlamaForCausalLM(tiny_llama_config(hidden_size=96)), [r"layers\.\d+\."])[1]
    with pytest.raises(LorqError, match="does not fit"):
        AdapterStore(many_adapters, other, 1 << 30).register("x", "ad1")

