"""Typed option fields: one place for a field's default and its help text.

The CLI (`lorq.cli`) and YAML loading are generated from these dataclass fields.
"""

from dataclasses import field
from typing import Any, Callable

from .errors import LorqError

# (test, what it asks) for check_ranges; a NaN fails every test
POSITIVE: tuple[Callable[[Any], bool], str] = (lambda v: v > 0, "positive")
NON_NEGATIVE: tuple[Callable[[Any], bool], str] = (lambda v: v >= 0, ">= 0")


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def check_ranges(cfg, rules: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    """Refuse the first field outside its range, by its option name: "top-p must be in (0, 1], got 0.0"."""
    for name, (ok, wanted) in rules.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise LorqError(f"{name.replace('_', '-')} must be {wanted}, got {value}")
