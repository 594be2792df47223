"""Value encodings between Python objects and record bytes."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Literal

import msgspec

from ._errors import ConfigError

Encoding = Literal["json", "bytes", "str"]

_json_enc = msgspec.json.Encoder()
_json_dec = msgspec.json.Decoder()


def encode_value(value: Any) -> bytes:
    """bytes pass through, str is UTF-8, anything else is JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return _json_enc.encode(value)


def decoder_for(
    encoding: Encoding | Callable[[bytes], Any], schema: type | None = None
) -> Callable[[bytes], Any]:
    """The function a source applies to each value; it raises on bad input."""
    if callable(encoding):
        return encoding
    if encoding == "json":
        if schema is not None:
            return msgspec.json.Decoder(schema).decode
        return _json_dec.decode
    if schema is not None:
        raise ConfigError("schema= needs value='json'")
    if encoding == "bytes":
        return bytes
    if encoding == "str":
        return lambda raw: raw.decode()
    raise ConfigError(
        f"unknown value encoding {encoding!r}: use 'json', 'bytes', 'str' or a function"
    )


def encoder_for(encoding: Encoding | Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    if callable(encoding):
        return encoding
    if encoding == "json":
        return encode_value
    if encoding in ("bytes", "str"):
        return encode_value
    raise ConfigError(
        f"unknown value encoding {encoding!r}: use 'json', 'bytes', 'str' or a function"
    )


_state_enc = msgspec.msgpack.Encoder()
_state_dec = msgspec.msgpack.Decoder()


def dump_state(value: Any) -> bytes:
    """State values are msgpack: fast, and safe to load (unlike pickle)."""
    try:
        return _state_enc.encode(value)
    except TypeError as exc:
        raise ConfigError(
            f"state value of type {type(value).__name__} cannot be stored: use dicts, lists, "
            "str, int, float, bool, None or msgspec Structs"
        ) from exc
    except OverflowError as exc:
        raise ConfigError(
            "state value holds an int outside the 64-bit range the state store keeps "
            f"({exc}); operator action: keep such numbers as str (or Decimal text) in state"
        ) from exc
    except UnicodeError as exc:
        raise ConfigError(f"state value holds a str that is not valid text ({exc})") from exc


def load_state(raw: bytes) -> Any:
    return _state_dec.decode(raw)


# The bare codec, for the executor's per-record copies (a call less than copy_state).
encode_state = _state_enc.encode
decode_state = _state_dec.decode


def copy_state(value: Any) -> Any:
    """A deep copy of a state value for a user function to mutate, as the store would
    give it back (tuples come back as lists, Structs as dicts, as after a restart).

    A value that cannot be stored is copied exactly instead: its epoch fails to commit
    and the record that made it becomes a dead letter, but until then a failed call must
    not leak into it either."""
    try:
        return decode_state(encode_state(value))
    except (TypeError, ValueError, OverflowError):
        try:
            return copy.deepcopy(value)
        except Exception:
            return value
