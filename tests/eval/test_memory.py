import gc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lorq.eval.memory import PeakRSS, own_file_backed_tensors, release_freed_memory


def test_peak_of_a_phase_counts_what_it_allocates_not_what_came_before():
    before = torch.ones(64 * 2**20 // 4)  # 64 MiB held before the phase: not part of it
    # glibc serves even 128 MiB from the heap's free top when earlier tests left one that large,
    # already resident: RSS would not grow. Returned to the OS first, the phase's pages are new.
    release_freed_memory()
    with PeakRSS() as m:
        x = torch.ones(128 * 2**20 // 4)  # 128 MiB, touched
        del x
    assert m.peak_mib >= m.start_mib
    if m.exact:  # Linux: the high-water mark was reset at the start
        assert 100 <= m.phase_mib <= 200
    del before


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""


def test_owning_the_loaded_tensors_releases_the_weights_file_and_keeps_values_and_ties(tmp_path):
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weights = str(tmp_path / "model.safetensors")
    if weights not in mapped_files():
        pytest.skip("this transformers reads safetensors without a memory map")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert own_file_backed_tensors(model) > 0
    gc.collect()
    assert weights not in mapped_files()  # nothing points into the file any more: the mapping is gone
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert own_file_backed_tensors(model) == 0  # idempotent


def test_quantizing_a_loaded_model_lets_its_weights_file_go(tmp_path):
    from conftest import tiny_llama_config

    from lorq.quant import quantize_model
    from lorq.quant.base import FormatConfig
    from lorq.quant.linear import DECODER_LINEARS

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weights = str(tmp_path / "model.safetensors")
    if weights not in mapped_files():
        pytest.skip("this transformers reads safetensors without a memory map")
    quantize_model(model, [(DECODER_LINEARS, FormatConfig(format="nf", bits=4, group_size=64))], progress=False)
    gc.collect()
    assert weights not in mapped_files()


HOLES = """
import sys, torch
from lorq.eval.memory import release_freed_memory, rss_mib, tight_heap
if sys.argv[1] == "tight":
    assert tight_heap()
big = torch.ones(16 * 2**18)
del big  # a 16 MiB free: glibc's default then serves blocks below 16 MiB from its heap
blocks = [torch.ones(2**18) for _ in range(300)]  # 300 x 1 MiB, touched
before = rss_mib()
del blocks[::2]  # every other one: gaps between live blocks
if sys.argv[1] == "trim":
    release_freed_memory()
print(before - rss_mib())
"""


def test_a_tight_heap_or_a_trim_returns_freed_tensors_that_the_default_heap_keeps():
    import subprocess
    import sys

    freed = {mode: float(subprocess.run([sys.executable, "-c", HOLES, mode], capture_output=True, text=True, check=True).stdout)
             for mode in ("default", "tight", "trim")}
    assert freed["tight"] >= 140  # 150 MiB freed: all of it left the process
    assert freed["default"] < 75  # the gaps stayed resident (what --tight-heap is for)
    assert freed["trim"] >= 140  # a trim hands the gaps' pages back (what --trim-heap does after each forward)
