"""Merges against their oracles: PEFT's merge_and_unload for dense bases, bitsandbytes'
re-quantization for the naive NF4 merge, and base + unmerged adapter for quantized ones."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorq.jobs import prepare_base
from lorq.merge import AdapterUpdate, MergeConfig, Requant, apply_unmerged, requantize, run_merge
from lorq.models.loading import load_model
from lorq.quant import FormatConfig, MethodConfig, QuantFormat, QuantizedLinear, QuantMethod

from conftest import make_adapter

peft = pytest.importorskip("peft")

X = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    return model(input_ids=X).logits


def merge(base, adapters, out, **kw):
    kw.setdefault("eval_blocks", 0)
    return run_merge(MergeConfig(model=str(base), adapter=list(adapters), output=str(out), **kw), progress=False)


def nf4() -> FormatConfig:
    return FormatConfig(format=QuantFormat.NF, bits=4)


def test_dense_merge_equals_peft_merge_and_unload(tiny_model_dir, adapters, tmp_path):
    summary = merge(tiny_model_dir, adapters[:1], tmp_path / "m")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = peft.PeftModel.from_pretrained(base, adapters[0]).merge_and_unload().eval()
    for name, w in ref.state_dict().items():
        assert torch.allclose(ours.state_dict()[name], w, atol=1e-6), name
    assert (logits(ours) - logits(ref)).abs().max() <= 1e-5
    assert summary["kind"] == "dense" and summary["memory"]["rss_peak_mib"] > 0


def test_weighted_combination_equals_peft_with_both_adapters_active(tiny_model_dir, adapters, tmp_path):
    merge(tiny_model_dir, adapters, tmp_path / "m", weights=[1.0, 0.5])
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters[0], adapter_name="a")
    pm.load_adapter(adapters[1], adapter_name="b")
    pm.base_model.set_adapter(["a", "b"])
    for module in pm.modules():
        if isinstance(getattr(module, "scaling", None), dict) and "b" in module.scaling:
            module.scaling["b"] *= 0.5
    assert (logits(ours) - logits(pm.eval())).abs().max() <= 1e-5


def test_shards_and_dtype(tiny_model_dir, adapters, tmp_path):
    merge(tiny_model_dir, adapters[:1], tmp_path / "one")
    merge(tiny_model_dir, adapters[:1], tmp_path / "sharded", max_shard_mb=4)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()
    assert torch.equal(logits(one), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()))
    merge(tiny_model_dir, adapters[:1], tmp_path / "bf16", dtype="bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    w = half.model.layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16 and torch.equal(w, one.model.layers[0].self_attn.q_proj.weight.bfloat16())


def unmerged_quantized(model_dir, adapters, quant=None, weights=None):
    base = prepare_base(str(model_dir), quant or FormatConfig(format=QuantFormat.NONE))
    apply_unmerged(base.model, AdapterUpdate.read(adapters, weights))
    return base.model.eval()


def test_fold_keeps_the_codes_and_is_exact(tiny_model_dir, adapters, tmp_path):
    summary = merge(tiny_model_dir, adapters, tmp_path / "m", quant=nf4(), requant="fold")
    merged, _, _ = load_model(str(tmp_path / "m"))
    ref = unmerged_quantized(tiny_model_dir, adapters, nf4())
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.rank == 4 + 8
    assert torch.equal(q.qweight().dequantize(), ref.model.layers[0].self_attn.q_proj.base.qweight().dequantize())
    diff = (logits(merged) - logits(ref)).abs().max()
    assert diff <= 2e-3 * logits(ref).abs().max()  # the factors are stored in fp16
    assert summary["relative_error_vs_exact"] < 1e-3


def test_compensated_requantization_beats_the_naive_merge(tiny_model_dir, adapters, tmp_path):
    """A small update (3% of ||W||, as fine-tuning makes) is rounded away by the naive merge;
    LoftQ's alternation from the base's codes keeps it whole (as exact as `fold`) at the same
    storage as base + adapter; LoRC's single round keeps part of it."""
    err = {}
    for requant in ("naive", "lorc", "loftq", "fold"):
        s = merge(tiny_model_dir, adapters[:1], tmp_path / requant, quant=nf4(), requant=requant, weights=[0.01])
        err[requant] = s["relative_error_vs_exact"]
        if requant == "naive":
            assert s["bits_per_weight"] == pytest.approx(4.137, abs=0.01)
    assert err["loftq"] < 0.1 * err["naive"] and err["lorc"] < err["naive"]
    assert err["loftq"] <= 1.5 * err["fold"] + 1e-5
    ref = logits(unmerged_quantized(tiny_model_dir, adapters[:1], nf4(), weights=[0.01]))
    diff = {k: (logits(load_model(str(tmp_path / k))[0]) - ref).abs().max() for k in ("naive", "loftq")}
    assert diff["loftq"] < 0.1 * diff["naive"]


def test_naive_merge_equals_bitsandbytes_requantization(tiny_model_dir, adapters):
    """Dequantize, add, re-quantize is what PEFT does for a bitsandbytes 4-bit base: with NF4
    codes equal to bitsandbytes' bit for bit, the naive merge must land on the same weights."""
    F = pytest.importorskip("bitsandbytes.functional")
    base = prepare_base(str(tiny_model_dir), nf4()).model
    layer = base.model.layers[1].mlp.down_proj
    update = AdapterUpdate.read(adapters[:1])
    B, A = update.stacked("model.layers.1.mlp.down_proj")
    merged, target, _ = requantize(layer, B, A, Requant.NAIVE, 0, MethodConfig())
    packed, state = F.quantize_4bit(target, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(merged.qweight().dequantize(torch.float32), F.dequantize_4bit(packed, state).float())


def test_merge_into_a_quantized_checkpoint_keeps_unadapted_layers(tiny_model_dir, tmp_path):
    from lorq.jobs import QuantizeConfig, run_quantize
    from lorq.quant.lowrank import LowRankMethod

    q = tmp_path / "q"
    run_quantize(QuantizeConfig(model=str(tiny_model_dir), output=str(q), quant=FormatConfig(format=QuantFormat.INT, bits=4, group_size=32),
                                method=MethodConfig(lowrank=LowRankMethod.LORC), rank=2, eval_blocks=0))
    ad = make_adapter(q, tmp_path / "ad", 3, rank=4, targets=[r"q_proj"])
    summary = merge(q, [ad], tmp_path / "m", requant_method="hqq", eval_blocks=1)
    base_meta = json.loads((q / "lorq_quant.json").read_text())
    meta = json.loads((tmp_path / "m" / "lorq_quant.json").read_text())
    k, qp = "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"
    assert meta["modules"][k] == base_meta["modules"][k] and meta["rules"] == base_meta["rules"]
    assert meta["modules"][qp]["rank"] == 2 + 4 and meta["modules"][qp]["method"] == "hqq"
    merged, _, _ = load_model(str(tmp_path / "m"))
    base, _, _ = load_model(str(q))
    assert torch.equal(merged.get_submodule(k).dequantize(), base.get_submodule(k).dequantize())
    assert summary["ppl_merged"] > 0 and "ppl_naive" in summary and (tmp_path / "m" / "merge_report.json").is_file()
    merge(q, [ad], tmp_path / "r3", merge_rank=3)
    assert json.loads((tmp_path / "r3" / "lorq_quant.json").read_text())["modules"][qp]["rank"] == 3


def test_report_compares_unmerged_and_merged(tiny_model_dir, adapters, tmp_path):
    summary = merge(tiny_model_dir, adapters[:1], tmp_path / "m", eval_blocks=1)
    assert summary["max_abs_logit_diff"] <= 1e-4 and abs(summary["ppl_change_pct"]) < 1e-3
    on_disk = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert on_disk["ppl_merged"] == summary["ppl_merged"] and on_disk["size_on_disk_mib"] > 0


def test_options_a_merge_cannot_use_are_said_to_be_ignored(tiny_model_dir, adapters, tmp_path, capsys):
    merge(tiny_model_dir, adapters[:1], tmp_path / "m", requant=Requant.NAIVE, dequantize=True)
    assert "--requant, --dequantize apply to a quantized base; this base is dense" in capsys.readouterr().out
    merge(tiny_model_dir, adapters[:1], tmp_path / "m", merge_rank=2)
    assert "--merge-rank applies to a quantized base; this base is dense, so it is ignored" in capsys.readouterr().out
    merge(tiny_model_dir, adapters[:1], tmp_path / "m", dtype="bf16")
    assert "lorq: note" not in capsys.readouterr().out
    merge(tiny_model_dir, adapters[:1], tmp_path / "q", quant=nf4(), dtype="fp16")
    assert "--dtype applies to a dense output; this merge writes a quantized model" in capsys.readouterr().out


def test_a_merge_whose_model_diverges_is_an_error(tiny_model_dir, adapters, tmp_path):
    """Weights finite in fp32 can still overflow in the forward pass: a NaN perplexity is not a success."""
    from lorq.errors import LorqError

    merge(tiny_model_dir, adapters[:1], tmp_path / "m", eval_blocks=1)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "m").iterdir())
    with pytest.raises(LorqError, match="make the model diverge; nothing was written"):
        merge(tiny_model_dir, adapters[:1], tmp_path / "m", eval_blocks=1, weights=[1e30])
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "m").iterdir()) == before  # the earlier merge is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # and no temporary is left


def test_fold_and_requantize_unit(tiny_llama):
    from lorq.quant import QuantizedLinear as QL

    lin = tiny_llama.model.layers[0].mlp.up_proj
    layer = QL.from_linear(lin, FormatConfig(format=QuantFormat.INT, bits=3, group_size=32))
    B, A = torch.randn(lin.out_features, 2) * 0.1, torch.randn(2, lin.in_features) * 0.1
    folded, target, _ = requantize(layer, B, A, Requant.FOLD, 0, MethodConfig())
    assert torch.equal(folded.qweight().dequantize(), layer.qweight().dequantize()) and folded.rank == 2
    assert torch.allclose(folded.dequantize(), target, atol=1e-3)
    for requant in (Requant.LORC, Requant.LOFTQ, Requant.QPISSA, Requant.LQ_LORA):
        merged, target, _ = requantize(layer, B, A, requant, 4, MethodConfig(method=QuantMethod.RTN))
        assert merged.rank == 4 and merged.cfg == layer.cfg


def test_dequantized_merge_of_a_quantized_base_is_a_plain_hf_checkpoint(tiny_model_dir, adapters, tmp_path):
    merge(tiny_model_dir, adapters[:1], tmp_path / "m", quant=nf4(), dequantize=True)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not (tmp_path / "m" / "lorq_quant.json").exists()
    assert (logits(dense) - logits(unmerged_quantized(tiny_model_dir, adapters[:1], nf4()))).abs().max() <= 1e-4
