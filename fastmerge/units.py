"""Byte sizes as users write them ("5B", "2GB", "500M", "1.5GiB") and as reports print them.

Compatibility note: mergekit's `--out-shard-size` reads a bare trailing "B" as *billion*
(its default "5B" is 5 * 10**9 bytes), so we do the same: configs and command lines written for
mergekit must produce the same shard layout here. "5GB" is the same size; plain bytes are
written without a unit ("1000000").
"""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import ConfigError
from .values import is_integer

_MULTIPLIERS = {
    "": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
    "b": 10**9,  # mergekit: "5B" = five billion
}  # fmt: skip
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A positive whole number of bytes from an int or a size string; ConfigError otherwise."""
    if is_integer(text):
        value = Fraction(text)
    elif isinstance(text, str) and (match := _SIZE.fullmatch(text)) is not None:
        unit = match.group(2).lower()
        if unit not in _MULTIPLIERS:
            raise ConfigError(
                f"size {text!r}: unknown unit {match.group(2)!r}; use K, M, G, T (powers of 1000), "
                "KiB, MiB, GiB, TiB (powers of 1024) or B (billion, as mergekit)"
            )
        value = Fraction(match.group(1)) * _MULTIPLIERS[unit]
    else:
        raise ConfigError(f"size {text!r} is not a size such as 5GB, 500M or 1.5GiB")
    if value.denominator != 1 or value <= 0:
        raise ConfigError(f"size {text!r} must be a positive whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Human-readable binary size for reports: 512 B, 1.50 KiB, 2 GiB, 13.48 GiB."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.2f} {unit}".replace(".00 ", " ")


def shards_summary(shards: int, nbytes: int) -> str:
    """"2 shards, 6.30 GiB": what a report says of a written checkpoint."""
    return f"{shards} shard{'s' if shards != 1 else ''}, {format_size(nbytes)}"
