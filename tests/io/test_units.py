"""parse_size / format_size."""

from __future__ import annotations

import pytest

from fastmerge.errors import ConfigError
from fastmerge.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("2GB", 2 * 10**9),
        ("500M", 500 * 10**6),
        ("500mb", 500 * 10**6),
        ("5B", 5 * 10**9),  # mergekit's default --out-shard-size: B means billion
        ("1.5GiB", 3 * 2**29),
        ("64KiB", 65536),
        ("2T", 2 * 10**12),
        ("1000000", 10**6),
        (" 7 K ", 7000),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "5XB", "1.5", "0", "-1", "5 G B", "1e9", True, 2.5, None]
)
def test_parse_size_rejects_bad_values(text):
    with pytest.raises(ConfigError) as err:
        parse_size(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.50 KiB"),
        (2**31, "2 GiB"),
        (14474836480, "13.48 GiB"),
        (2**60, "1024 PiB"),
    ],
)
def test_format_size(n, text):
    assert format_size(n) == text
