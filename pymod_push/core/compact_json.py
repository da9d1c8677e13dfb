"""Compact JSON (no spaces) for what is encoded once per push: a provider's payload, a
notification's summary in the outbox.

json.dumps makes a JSONEncoder per call, and JSONEncoder.encode makes its C encoder per
call, which is most of what encoding a small payload takes: the C encoder here is made
once. Not circular-checked (our data never is).
"""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]

_COMPACT = json.JSONEncoder(separators=(",", ":"))
_C_ENCODER = c_make_encoder and c_make_encoder(
    None, _COMPACT.default, encode_basestring_ascii, None, ":", ",", False, False, True)


def dumps(data: object) -> str:
    """json.dumps(data, separators=(",", ":")), ASCII only."""
    if _C_ENCODER is not None:
        return "".join(_C_ENCODER(data, 0))
    return _COMPACT.encode(data)
