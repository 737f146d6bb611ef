from dataclasses import dataclass

import pytest

from lorq.errors import LorqError
from lorq.options import NON_NEGATIVE, POSITIVE, check_ranges


@dataclass
class Knobs:
    steps: int = 3
    eval_blocks: int = 0
    top_p: float = 1.0


RULES = {"steps": POSITIVE, "eval_blocks": NON_NEGATIVE, "top_p": (lambda v: 0 < v <= 1, "in (0, 1]")}


@pytest.mark.parametrize("field, value, message", [("steps", 0, "steps must be positive, got 0"),
                                                   ("eval_blocks", -1, "eval-blocks must be >= 0, got -1"),
                                                   ("top_p", 1.5, "top-p must be in (0, 1], got 1.5"),
                                                   ("steps", float("nan"), "steps must be positive, got nan")])
def test_check_ranges_names_the_option_at_fault(field, value, message):
    check_ranges(Knobs(), RULES)  # all in range
    with pytest.raises(LorqError) as e:
        check_ranges(Knobs(**{field: value}), RULES)
    assert str(e.value) == message
