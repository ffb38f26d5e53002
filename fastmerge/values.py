"""Type checks for values read from configs, CLI options and file headers.

YAML and JSON decode true/false to bool, which Python counts as an int; a flag or a boolean
where a count or a number belongs is a mistake to report, not a 1 or a 0 to use, so these
checks leave bools out.
"""

from __future__ import annotations


def is_integer(value: object) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool (a float may still be inf or NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
