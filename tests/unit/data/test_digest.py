from __future__ import annotations

from pathlib import Path

from carsearch.data.digest import json_digest, json_stream_digest


def test_digests_are_pinned() -> None:
    """Cache file names and keys on disk were written with these exact digests: they must never change."""
    assert json_digest({"b": 1, "a": [1, 2.5, None]}) == "bf2f5dd92c37d634"
    assert json_digest({"a": [1, 2.5, None], "b": 1}) == "bf2f5dd92c37d634"  # key order does not matter
    assert json_digest(["x", 3], size=4) == "7c115da9"
    assert json_stream_digest([[1], [2, "y"]], size=10) == "05c5e9e31965f99f831e"


def test_a_stream_of_one_value_is_that_value_and_non_json_values_hash_as_text() -> None:
    assert json_stream_digest([{"k": [1, 2]}]) == json_digest({"k": [1, 2]})
    assert json_digest([Path("/p")]) == json_digest(["/p"])
    assert len(json_digest(1, size=10)) == 20
