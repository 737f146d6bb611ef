"""GGUF export read back by transformers' own GGUF loader (the oracle): F32 exact, F16 and Q8_0
equal to the source with its weights rounded the way each type stores them."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorq.errors import LorqError
from lorq.merge import ExportConfig, export_gguf
from lorq.merge.gguf import rope_interleave

gguf = pytest.importorskip("gguf")

X = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    return model(input_ids=X).logits


def export(model_dir, out, outtype, adapters=()):
    return export_gguf(ExportConfig(model=str(model_dir), adapter=list(adapters), output=str(out), outtype=outtype, verify=False), progress=False)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 by ggml's reference quantizer: blocks of 32 along the row, d = absmax / 127,
    q = roundf(x · (1/d)) (halves away from zero) with d in fp32, stored with d in fp16."""
    blocks = w.reshape(-1, 32)
    d = blocks.abs().amax(1, keepdim=True) / 127
    scaled = blocks * torch.where(d > 0, 1 / d, 0)
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (q * d.half().float()).reshape(w.shape)


def rounded_source(model_dir, rounding):
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(rounding(p))
    return model


def test_f32_round_trip_is_exact_and_merges_the_adapter(tiny_model_dir, adapters, tmp_path):
    peft = pytest.importorskip("peft")
    summary = export_gguf(ExportConfig(model=str(tiny_model_dir), adapter=[adapters[0]], output=str(tmp_path / "m.gguf"), outtype="f32"), progress=False)
    assert summary["max_abs_logit_diff"] <= 1e-4  # verify=True compares inside the export too
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[0]).merge_and_unload().eval()
    assert (logits(load(tmp_path / "m.gguf")) - logits(ref)).abs().max() <= 1e-4


def test_f16_and_q8_0_match_the_rounded_source(tiny_model_dir, tmp_path):
    for outtype, rounding in (("f16", lambda w: w.half().float()), ("q8_0", q8_0)):
        path = tmp_path / f"m-{outtype}.gguf"
        export(tiny_model_dir, path, outtype)
        reader = gguf.GGUFReader(str(path))
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["blk.0.attn_q.weight"] == outtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
        want = logits(rounded_source(tiny_model_dir, rounding))
        assert (logits(load(path)) - want).abs().max() <= 1e-4, outtype


def test_tokenizer_and_metadata_survive(tiny_model_dir, tmp_path):
    path = tmp_path / "m.gguf"
    export(tiny_model_dir, path, "q8_0")
    ours, back = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "def f(x):\n    return x ** 2  # héllo wörld <|im_start|>user\nHi<|im_end|>"
    assert ours(text)["input_ids"] == back(text)["input_ids"]
    assert back.chat_template == ours.chat_template and back.eos_token_id == ours.eos_token_id
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "llama" and fields["llama.block_count"].contents() == 2
    assert fields["general.name"].contents() == tiny_model_dir.name


def test_a_gguf_exported_or_served_from_a_gguf_keeps_its_name(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Not the name of the cache directory the source GGUF was converted into."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    export(tiny_model_dir, tmp_path / "tiny-f32.gguf", "f32")
    capsys.readouterr()
    export(tmp_path / "tiny-f32.gguf", tmp_path / "again.gguf", "f32")
    assert gguf.GGUFReader(str(tmp_path / "again.gguf")).fields["general.name"].contents() == "tiny-f32"
    assert "\nexported tiny-f32 as GGUF f32" in capsys.readouterr().out
    from lorq.jobs import serving_server
    from lorq.serve.server import ServeConfig
    assert serving_server(ServeConfig(model=str(tmp_path / "tiny-f32.gguf"))).base_name == "tiny-f32"


def test_the_pre_tokenizer_name_follows_the_gguf_the_model_came_from(tiny_model_dir, tmp_path, capsys):
    """The embedded model's GGUF says smollm; a GGUF exported from a model with its tokenizer
    must say so too, or llama.cpp splits text with its default (llama) rules."""
    from lorq.models.loading import embedded_gguf, gguf_pre

    def written(path):
        return gguf.GGUFReader(str(path)).fields["tokenizer.ggml.pre"].contents()

    assert gguf_pre(embedded_gguf()) == "smollm"
    export(tiny_model_dir, tmp_path / "auto.gguf", "f32")  # the tiny model carries the embedded tokenizer
    assert written(tmp_path / "auto.gguf") == "smollm"
    export_gguf(ExportConfig(model=str(tiny_model_dir), output=str(tmp_path / "given.gguf"), outtype="f32", tokenizer_pre="llama-bpe", verify=False), progress=False)
    assert written(tmp_path / "given.gguf") == "llama-bpe"
    capsys.readouterr()
    export_gguf(ExportConfig(model=str(tiny_model_dir), output=str(tmp_path / "typo.gguf"), outtype="f32", tokenizer_pre="smolm", verify=False), progress=False)
    assert written(tmp_path / "typo.gguf") == "smolm"  # written as given: a newer llama.cpp may know names this list lacks
    assert "did you mean 'smollm'?" in capsys.readouterr().out
    bare = tmp_path / "bare"  # a tokenizer that never came from a GGUF file
    shutil.copytree(tiny_model_dir, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("gguf_tokenizer_pre")
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    export(bare, tmp_path / "bare.gguf", "f32")
    assert written(tmp_path / "bare.gguf") == "default" and "Pass --tokenizer-pre" in capsys.readouterr().out
    with pytest.raises(LorqError, match="not a llama.cpp pre-tokenizer name"):
        export_gguf(ExportConfig(model=str(tiny_model_dir), output=str(tmp_path / "x.gguf"), tokenizer_pre="Llama BPE", verify=False), progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_rope_interleave_is_what_transformers_undoes():
    w = torch.arange(8 * 3 * 2, dtype=torch.float32).reshape(24, 2)  # 3 heads of dim 8
    d = 24 // 3 // 2
    undone = rope_interleave(w, 3).reshape(3, d, 2, 2).transpose(1, 2).reshape(24, 2)
    assert torch.equal(undone, w) and not torch.equal(rope_interleave(w, 3), w)


def test_unsupported_architecture_is_an_error(tmp_path, real_tokenizer_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lorq.models.loading import load_tokenizer

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=49152)).save_pretrained(tmp_path / "gpt2")
    load_tokenizer(real_tokenizer_dir).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(LorqError, match="supports llama"):
        export(tmp_path / "gpt2", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_verification_runs_before_the_file_takes_its_place(tiny_model_dir, adapters, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "huge-adapter"  # finite in fp32, beyond fp16's range once merged
    shutil.copytree(adapters[0], bad)
    tensors = {k: torch.full_like(v, 1000.0) for k, v in load_file(bad / "adapter_model.safetensors").items()}
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "m.gguf"
    export(tiny_model_dir, out, "f16")  # an earlier export may be replaced, but not by a broken one
    before = out.read_bytes()
    with pytest.raises(LorqError, match="non-finite"):
        export_gguf(ExportConfig(model=str(tiny_model_dir), adapter=[str(bad)], output=str(out), outtype="f16"), progress=False)
    assert out.read_bytes() == before and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    import lorq.merge.gguf

    def never(*a, **k):
        raise AssertionError("the model was opened (a .gguf converted) before the output was checked")

    monkeypatch.setattr(lorq.merge.gguf, "open_source", never)
    with pytest.raises(LorqError, match="overlaps"):  # a GGUF model is never its own output, refused before converting it
        export_gguf(ExportConfig(model=str(out), output=str(out), outtype="q8_0", verify=False), progress=False)
    assert out.read_bytes() == before
