"""Short stable digests of JSON-able values: the names of cache files and the keys of cached work.

One spelling of the value (``json.dumps`` with sorted keys, anything else as ``str``) hashed with BLAKE2b,
so a digest written by one version is found again by the next: changing either changes every cache key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def json_digest(value: Any, size: int = 8) -> str:
    """Hex BLAKE2b digest (``size`` bytes) of ``value``'s JSON (keys sorted; a non-JSON value as its ``str``)."""
    return json_stream_digest([value], size)


def json_stream_digest(values: Iterable[Any], size: int = 8) -> str:
    """:func:`json_digest` of values fed one after another (their JSON texts concatenated): a long sequence
    hashed without holding its text."""
    digest = hashlib.blake2b(digest_size=size)
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()
