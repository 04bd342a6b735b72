"""Command-line number types every sub-command shares: the value, or an argparse error saying what was
expected and what came."""
from __future__ import annotations

import argparse


def number(kind=float, *, what: str = "a number", minimum=None, above=None, multiple_of: int | None = None):
    """An argparse `type=` for `kind` (int or float) that is at least `minimum`, more than `above` and a
    multiple of `multiple_of` (each when given)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if multiple_of and value % multiple_of:
            examples = ", ".join(str(multiple_of * k) for k in (1, 2, 3))
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of} ({examples}, ...), got {value}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be more than {above}, got {value}")
        return value
    return parse
