"""Typed option fields: one place for a field's default and its help text.

The CLI (`lorq.cli`) and YAML loading are generated from these dataclass fields.
"""

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})
