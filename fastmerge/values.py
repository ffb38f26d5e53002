"""Type checks for values read from configs, CLI options and file headers.

YAML and JSON decode true/false to bool, which Python counts as an int; a flag or a boolean
where a count or a number belongs is a mistake to report, not a 1 or a 0 to use, so these
checks leave bools out.
"""

from __future__ import annotations

import math

from .errors import ConfigError


def is_integer(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool (a float may still be inf or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value: object) -> bool:
    """A number (`is_number`) that is neither inf nor NaN: NaN passes every range check (each
    comparison with it is false), so ranges are checked on finite numbers only."""
    return is_number(value) and math.isfinite(value)


def check_seed(seed: object) -> int:
    """A random seed as every command takes it: an integer in [0, 2**64), the range the Philox
    key derivation (ops/random.py) accepts; a ConfigError naming it otherwise."""
    if not is_integer(seed) or not 0 <= seed < 2**64:
        raise ConfigError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    return seed
