"""GGUF export (llama.cpp's format) of a model, merged with adapters on the way if given.

Tensors stream from the checkpoint as in `lorq merge` (a lorq quantized base is dequantized,
Q + L; adapters are added as ΔW), are renamed to llama.cpp's names and stored as F32, F16 or
Q8_0 (blocks of 32 weights, an fp16 scale absmax/127 each, int8 codes; written by the `gguf`
package's own quantizer). 1-D tensors (norms) stay F32, as llama.cpp's converter keeps them.
llama.cpp orders each head's query/key rows for interleaved rotary pairs, HF for halves, so
attn_q/attn_k rows are permuted (transformers' GGUF loader undoes exactly this permutation).
The tokenizer goes in as llama.cpp's "gpt2" BPE: tokens by id, merges, token types, special ids.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from ..errors import LorqError
from ..io import check_output_file, temp_sibling
from ..models.loading import DEFAULT_MODEL, GGUF_PRE, MODEL_HELP, load_tokenizer, model_label
from ..options import opt
from .delta import AdapterUpdate
from .merge import OutDtype, check_targets, dense_specs, dense_tensor, no_quant, open_source


class GGUFType(str, Enum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"


@dataclass
class ExportConfig:
    model: str = opt(DEFAULT_MODEL, MODEL_HELP + "; a quantized checkpoint is dequantized")
    adapter: list[str] = opt([], "PEFT adapter directories merged into the exported weights (optional)")
    weights: list[float] = opt([], "weight of each adapter's update (default: 1 each)")
    output: str = opt("runs/model.gguf", "the GGUF file to write")
    outtype: GGUFType = opt(GGUFType.F16, "tensor type of the 2-D weights: f32, f16 or q8_0 (norms stay f32)")
    tokenizer_pre: str = opt("auto", "llama.cpp's pre-tokenizer name stored in the file (how llama.cpp splits text before BPE: smollm, llama-bpe, qwen2, ...); "
                                     "auto: the one of the GGUF the model came from (the embedded model's is smollm), else default; transformers does not use it")
    verify: bool = opt(True, "load the file back with transformers' GGUF loader and compare its logits with the source's")


# HF llama parameter names -> llama.cpp tensor names ({} = the block number)
LLAMA_TENSORS = {
    r"model\.embed_tokens\.weight": "token_embd.weight",
    r"model\.norm\.weight": "output_norm.weight",
    r"lm_head\.weight": "output.weight",
    r"model\.layers\.(\d+)\.input_layernorm\.weight": "blk.{}.attn_norm.weight",
    r"model\.layers\.(\d+)\.post_attention_layernorm\.weight": "blk.{}.ffn_norm.weight",
    r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight": "blk.{}.attn_q.weight",
    r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight": "blk.{}.attn_k.weight",
    r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight": "blk.{}.attn_v.weight",
    r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight": "blk.{}.attn_output.weight",
    r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight": "blk.{}.ffn_gate.weight",
    r"model\.layers\.(\d+)\.mlp\.up_proj\.weight": "blk.{}.ffn_up.weight",
    r"model\.layers\.(\d+)\.mlp\.down_proj\.weight": "blk.{}.ffn_down.weight",
}
SUPPORTED = ("llama",)
PROBE = "The with statement wraps a block in a context manager:\n\nwith open(path) as f:\n    data = f.read()\n"
Q8_BLOCK = 32


def gguf_name(name: str) -> str:
    for pattern, target in LLAMA_TENSORS.items():
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups())
    raise LorqError(f"GGUF export does not know where {name} goes in a llama model")


def rope_interleave(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (each head's first half, then second half) -> llama.cpp's (pairs)."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_array(t: torch.Tensor, outtype: GGUFType):
    """(numpy array, GGML type or None for the array's own dtype) for one tensor."""
    import gguf

    t = t.float()
    if t.dim() == 1 or outtype is GGUFType.F32:
        return t.numpy(), None
    if outtype is GGUFType.Q8_0 and t.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return t.half().numpy(), None  # f16, and q8_0 rows that are not a multiple of 32


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise LorqError("GGUF export supports llama models with plain RoPE (no rope scaling)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise LorqError("the model config has no rope_theta")
    return float(theta)


def add_hparams(w, config, outtype: GGUFType) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    ftype = {GGUFType.F32: gguf.LlamaFileType.ALL_F32, GGUFType.F16: gguf.LlamaFileType.MOSTLY_F16,
             GGUFType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    w.add_file_type(int(ftype))


def add_tokenizer(w, tok, vocab_size: int, pre: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model."""
    import gguf

    if not getattr(tok, "is_fast", False):
        raise LorqError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LorqError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if vocab_size < len(by_id):
        raise LorqError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (padded embeddings) get placeholder names
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        token_id = getattr(tok, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(bool(probe) and tok.bos_token_id is not None and probe[0] == tok.bos_token_id)
    if isinstance(getattr(tok, "chat_template", None), str):
        w.add_chat_template(tok.chat_template)


PRE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # llama.cpp's names: llama-bpe, gpt-2, deepseek-v3, a.x-4.0, ...
# the BPE pre-tokenizer names llama.cpp's llama-vocab.cpp recognizes (late 2025); it reads any
# other name as 'default' with a warning, and newer versions add names, so others get a note
KNOWN_PRE = frozenset("""
    default llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 deepseek-llm deepseek-coder deepseek-v3
    falcon mpt starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum jina-v1-en
    jina-v2-code roberta-bpe refact command-r qwen2 deepseek-r1-qwen kormo stablelm2 olmo dbrx smaug-bpe poro-chat
    glm4 chatglm-bpe viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 chameleon minerva-7b megrez
    gpt-4o llama4 superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense
    kimi-k2 grok-2 afmoe minimax-m2
""".split())


def check_tokenizer_pre(name: str) -> str:
    if name != "auto" and not PRE_NAME.fullmatch(name):
        raise LorqError(f"--tokenizer-pre {name!r} is not a llama.cpp pre-tokenizer name (lowercase letters, digits, '.', '_', '-': "
                        "smollm, llama-bpe, qwen2, ...), or auto")
    return name


def tokenizer_pre(name: str, tok) -> str:
    """The pre-tokenizer name to store: the one given, or with auto the one recorded when the
    model was converted from a GGUF file; else llama.cpp's default (with a note: llama.cpp may
    then split text otherwise than the model's tokenizer does)."""
    if name != "auto":
        if name not in KNOWN_PRE:
            close = difflib.get_close_matches(name, sorted(KNOWN_PRE), n=1)
            print(f"lorq: note: --tokenizer-pre {name!r} is not a pre-tokenizer name llama.cpp knew in late 2025"
                  + (f" (did you mean {close[0]!r}?)" if close else "") + "; a llama.cpp that does not know it splits text as 'default'", flush=True)
        return name
    recorded = tok.init_kwargs.get(GGUF_PRE)
    if isinstance(recorded, str) and PRE_NAME.fullmatch(recorded):
        return recorded
    print("lorq: note: the tokenizer's llama.cpp pre-tokenizer is unknown (the model did not come from a GGUF file); the file says "
        "'default'. Pass --tokenizer-pre with llama.cpp's name for it (e.g. llama-bpe, qwen2) so that llama.cpp splits text as the model does", flush=True)
    return "default"


def export_gguf(cfg: ExportConfig, progress: bool = True, also_reads=()) -> dict:
    import gguf
    from tqdm.auto import tqdm

    cfg.outtype = GGUFType(cfg.outtype)
    check_tokenizer_pre(cfg.tokenizer_pre)
    check_output_file(cfg.output, b"GGUF", "GGUF file", reads=[cfg.model, *cfg.adapter, *also_reads])  # before a .gguf model is converted
    src = open_source(cfg.model, no_quant())
    if src.config.model_type not in SUPPORTED:
        raise LorqError(f"GGUF export supports {', '.join(SUPPORTED)} models; {src.path} is {src.config.model_type!r}")
    if cfg.weights and not cfg.adapter:
        raise LorqError("--weights applies to the --adapter given; there is none")
    update = AdapterUpdate.read(cfg.adapter, cfg.weights) if cfg.adapter else AdapterUpdate([], [])
    check_targets(src, update)
    # only an earlier GGUF file may be replaced, and never a file of the model or adapters read
    out = check_output_file(cfg.output, b"GGUF", "GGUF file", reads=[cfg.model, src.path, *update.paths, *also_reads])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, ".gguf")
    start = time.perf_counter()
    config = src.config
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads or config.num_attention_heads}
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(model_label(cfg.model))
        add_hparams(w, config, cfg.outtype)
        tok = load_tokenizer(src.path)
        pre = tokenizer_pre(cfg.tokenizer_pre, tok)
        add_tokenizer(w, tok, config.vocab_size, pre)
        for spec in tqdm(dense_specs(src, OutDtype.AUTO), desc="gguf", unit="tensor", disable=not progress):
            t = dense_tensor(src, update, spec.name).float()
            proj = spec.name.rsplit(".", 2)[-2]
            if proj in heads and spec.name.endswith(f"self_attn.{proj}.weight"):
                t = rope_interleave(t, heads[proj])
            array, raw = to_gguf_array(t, cfg.outtype)
            w.add_tensor(gguf_name(spec.name), array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        seconds = time.perf_counter() - start
        diff = verify_gguf(cfg, update, tmp) if cfg.verify else None  # before the file takes the output's place
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    summary = {"model": str(src.path), "adapters": [str(p) for p in update.paths], "output": str(out),
               "outtype": cfg.outtype.value, "tokenizer_pre": pre, "size_mib": round(out.stat().st_size / 2**20, 2), "seconds": round(seconds, 2)}
    if cfg.verify:
        summary["max_abs_logit_diff"] = diff
    check = f", max |Δlogit| vs the source {summary['max_abs_logit_diff']:.2e} (read back by transformers)" if cfg.verify else ""
    print(f"exported {model_label(cfg.model)}{' + ' + str(len(update.paths)) + ' adapter(s)' if update.paths else ''} as GGUF {cfg.outtype.value}: "
          f"{summary['size_mib']:.1f} MiB in {summary['seconds']:.1f} s{check} -> {out}")
    return summary


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorqError(f"transformers cannot read {path}: {str(e).splitlines()[0]}")


@torch.no_grad()
def verify_gguf(cfg: ExportConfig, update: AdapterUpdate, out: Path) -> float:
    """Largest |logit difference| between the source (+ adapters) and the GGUF file as
    transformers loads it, on a fixed text."""
    from ..jobs import prepare_base
    from .delta import apply_unmerged

    base = prepare_base(cfg.model, no_quant())
    if update.paths:
        apply_unmerged(base.model, update)
    probe = base.tok(PROBE, return_tensors="pt").input_ids
    want = base.model(input_ids=probe).logits.float()
    got = load_gguf(out)(input_ids=probe).logits.float()
    if not torch.isfinite(want).all():
        raise LorqError("the source model (with its adapters) gives non-finite logits; nothing was written")
    if not torch.isfinite(got).all():
        raise LorqError("the GGUF file read back gives non-finite logits; nothing was written")
    return (got - want).abs().max().item()

