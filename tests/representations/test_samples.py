import json

import pytest

from fastmerge.errors import ConfigError
from fastmerge.representations.samples import load_samples


def test_txt_skips_blank_lines(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("first\n\n  \nsecond one\n")
    assert load_samples(path) == ["first", "second one"]


def test_jsonl_text_key_or_single_string(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "a", "label": 1}) + "\n" + json.dumps({"question": "b"}) + "\n")
    assert load_samples(str(path)) == ["a", "b"]


def test_list_passes_through():
    assert load_samples(["x", "y"]) == ["x", "y"]


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "no samples"),
        (b"\n \n", "no samples"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"abc\x00def", "NUL"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "s.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_samples(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_samples(tmp_path / "nope.jsonl")


def test_jsonl_without_text_names_the_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok"}\n{"a": "x", "b": "y"}\n')
    with pytest.raises(ConfigError, match=r"s.jsonl:2"):
        load_samples(path)


def test_bad_list_entry():
    with pytest.raises(ConfigError, match="sample 1"):
        load_samples(["fine", ""])
