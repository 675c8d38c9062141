"""Counts in printed text: "1 read", "2 reads". No ffinterp imports, so every layer may use it."""

from __future__ import annotations


def plural(n: int | float, noun: str, many: str | None = None) -> str:
    """``noun`` for exactly one, else ``many`` (default: ``noun`` + "s", or + "es" after s, x,
    ch and sh): the word that goes with a count of ``n``."""
    if n == 1:
        return noun
    if many is not None:
        return many
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def count(n: int, noun: str, many: str | None = None) -> str:
    """``n`` with thousands separators and the noun that agrees with it: ``count(1, "read")``
    is "1 read", ``count(2048, "glitch")`` is "2,048 glitches"."""
    return f"{n:,} {plural(n, noun, many)}"


__all__ = ["count", "plural"]
