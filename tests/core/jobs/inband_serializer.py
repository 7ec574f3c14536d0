"""A ``PYDRA_SERIALIZER`` for tests/core/test_payload.py: pickle's functions without its out-of-band arguments."""

from __future__ import annotations

import pickle
from typing import Any


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    return pickle.dumps(obj, protocol)


def loads(data: bytes) -> Any:
    return pickle.loads(data)
