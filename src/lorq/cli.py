"""`lorq <stage> [options]`: one sub-command per stage, options generated from the typed configs.

Nested config sections (quant, lora, data, train) are flattened into top-level options
(`--rank`, `--group-size`, ...). `--config FILE.yaml` loads the same options (flat, or nested
by section); options given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import sys
import types
import typing
from enum import Enum
from pathlib import Path

from .errors import LorqError, SystemRefusal
from .quant.base import check_release1_bits

COMMANDS = {
    "quantize": ("QuantizeConfig", "run_quantize", "quantize a model's decoder linear layers and write a quantized checkpoint"),
    "finetune": ("FinetuneConfig", "run_finetune", "fine-tune a LoRA adapter on a quantized base (the main job)"),
    "eval": ("EvalConfig", "run_eval", "perplexity of a base, a quantized checkpoint, or base + adapter"),
    "generate": ("GenerateConfig", "run_generate", "generate text from a prompt"),
    "merge": ("MergeConfig", "run_merge", "fold adapters into a dense or quantized base (streaming) and report the accuracy kept"),
    "export": ("ExportConfig", "export_gguf", "write a model (merged with adapters if given) as a GGUF file: f32, f16 or q8_0"),
    "serve": ("ServeConfig", "run_serve", "serve the base model and many adapters behind an OpenAI-compatible HTTP API"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        raise LorqError(message)


def _base_type(tp):
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def leaf_fields(cls) -> dict[str, tuple[tuple[str, ...], dataclasses.Field, type]]:
    """Flattened option name -> (path of attribute names, field, resolved type)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for name, (path, ff, t) in leaf_fields(tp).items():
                out[name] = ((f.name,) + path, ff, t)
        else:
            out[f.name] = ((f.name,), f, tp)
    return out


class Spelled(str):
    """An option's canonical value that remembers how it was written: a release-1 format name
    such as `nf4` also says its bit width, which --bits must not contradict."""

    def __new__(cls, canonical: str, written: str):
        s = super().__new__(cls, canonical)
        s.written = written
        return s


def _canonical(enum: type[Enum]):
    """Option value -> the enum's canonical value, so names the enum also accepts (e.g. the
    release-1 format `nf4`) pass argparse's choices; anything else is left for it to reject."""

    def convert(value: str) -> str:
        try:
            canonical = enum(value).value
        except ValueError:
            return value
        return canonical if canonical == value else Spelled(canonical, value)

    return convert


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    defaults = cls()
    for name, (path, f, tp) in leaf_fields(cls).items():
        default = defaults
        for p in path:
            default = getattr(default, p)
        flags = ["--" + name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help strings
        base = _base_type(tp)
        shown = default.value if isinstance(default, Enum) else default
        # a help text that states its own default ("default: 4, or 8 for ...") keeps only that
        default_note = "" if "default:" in help_text else f" (default: {str(shown).replace('%', '%%')})"
        kw = dict(dest=name, default=argparse.SUPPRESS, help=help_text + default_note)
        if base is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(base) is list:
            parser.add_argument(*flags, nargs="+", type=typing.get_args(base)[0], metavar="X", **kw)
        elif isinstance(base, type) and issubclass(base, Enum):
            parser.add_argument(*flags, choices=[e.value for e in base], type=_canonical(base), **kw)
        else:
            parser.add_argument(*flags, type=base, metavar=base.__name__.upper(), **kw)


def put(flat: dict, key: str, value, where: str) -> None:
    """flat[key] = value, unless the file already set that option (a second value is a mistake)."""
    if key in flat:
        raise LorqError(f"{where}: option {key} is given twice (as a section entry, an alias or a top-level key)")
    flat[key] = value


def _flatten_yaml(data: dict, cls, where: str) -> dict:
    fields = leaf_fields(cls)
    sections = {path[0] for path, _, _ in fields.values() if len(path) > 1}
    flat = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise LorqError(f"{where}: option names are text, got {key!r}")
        key = key.replace("-", "_")
        if key in sections and (key not in fields or isinstance(value, dict)):  # `method` is a section and an option
            if not isinstance(value, dict):
                raise LorqError(f"{where}: {key} is a section: give it a mapping of options, got {value!r}")
            for k, v in value.items():
                if not isinstance(k, str):
                    raise LorqError(f"{where}: option names are text, got {k!r}")
                put(flat, k.replace("-", "_"), v, where)
        else:
            put(flat, key, value, where)
    aliases = {a.lstrip("-").replace("-", "_"): name for name, (_, f, _) in fields.items() for a in f.metadata.get("aliases", ())}
    named = {}
    for k, v in flat.items():
        put(named, aliases.get(k, k), v, where)
    flat = named
    unknown = [k for k in flat if k not in fields]
    if unknown:
        raise LorqError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}")
    return flat


def load_yaml(path: str, cls) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LorqError(f"config file {p} not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LorqError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise LorqError(f"config file {p} must hold a mapping of options")
    return _flatten_yaml(data, cls, str(p))


INT64 = 2**63


def _scalar(value, base):
    """value as `base`, only where YAML's type means the same thing: no 1.7 -> 1, true -> 1.0,
    [a] -> "['a']"; integers in int64 (seeds reach torch), floats finite."""
    if isinstance(base, type) and issubclass(base, Enum):
        return base(value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError
    if base is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        value = int(value)
        if not -INT64 <= value < INT64:
            raise ValueError
        return value
    value = base(value)
    if base is float and not math.isfinite(value):
        raise ValueError
    return value


def _coerce(value, tp, name: str):
    base = _base_type(tp)
    if value is None:
        if base is not tp:  # Optional: null is its "not given"
            return None
        raise LorqError(f"{name.replace('_', '-')} cannot be null")
    try:
        if typing.get_origin(base) is list:
            return [_scalar(v, typing.get_args(base)[0]) for v in (value if isinstance(value, list) else [value])]
        return _scalar(value, base)
    except (ValueError, TypeError, OverflowError):
        item = typing.get_args(base)[0] if typing.get_origin(base) is list else base
        what = ("finite numbers" if item is float and item is not base else "a finite number" if item is float
                else f"one of {', '.join(m.value for m in item)}" if isinstance(item, type) and issubclass(item, Enum) else f"{item.__name__} values")
        raise LorqError(f"invalid value {value!r} for {name.replace('_', '-')} (expected {what})")


def build_config(cls, options: dict):
    """A config instance from flat option values (anything missing keeps its default)."""
    cfg = cls()
    for name, (path, _, tp) in leaf_fields(cls).items():
        if name in options:
            target = cfg
            for p in path[:-1]:
                target = getattr(target, p)
            setattr(target, path[-1], _coerce(options[name], tp, name))
    return cfg


def make_parser() -> argparse.ArgumentParser:
    from . import jobs

    parser = Parser(prog="lorq", description="Quantize LLMs, fine-tune LoRA adapters on the quantized base, export them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, (cfg_name, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE.yaml", help="load options from a YAML file (command-line options win; default: none)")
        add_options(p, getattr(jobs, cfg_name))
    return parser


def end_progress_bars() -> None:
    """Close bars an error left open, so the message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    try:
        parser = make_parser()
        args = vars(parser.parse_args(argv))
        command = args.pop("command")
        if command is None:
            parser.print_help()
            return 2
        from transformers.utils import logging as hf_logging

        from . import jobs

        hf_logging.disable_progress_bar()  # lorq shows its own progress; HF's per-file bars are noise
        cfg_name, fn_name, _ = COMMANDS[command]
        cls = getattr(jobs, cfg_name)
        yaml_path = args.pop("config", None)
        options = load_yaml(yaml_path, cls) if yaml_path else {}
        options.update(args)
        check_release1_bits(options.get("format"), options.get("bits"))  # the spelling is gone once coerced
        cfg = build_config(cls, options)
        writes = "also_reads" in inspect.signature(getattr(jobs, fn_name)).parameters
        # an output must not replace the YAML file it was configured from
        getattr(jobs, fn_name)(cfg, **({"also_reads": [yaml_path]} if writes and yaml_path else {}))
        return 0
    except LorqError as e:
        end_progress_bars()
        print(f"lorq: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, SystemRefusal) else 2
    except OSError as e:  # a path the system refused: permissions, a full disk, a name too long
        end_progress_bars()
        print(f"lorq: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("LORQ_DEBUG"):
            raise
        end_progress_bars()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"lorq: error: {type(e).__name__}: {first} (unexpected; LORQ_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        end_progress_bars()
        print("lorq: interrupted (completed checkpoints and outputs are intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
