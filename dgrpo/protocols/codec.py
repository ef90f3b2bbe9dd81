"""Bytes <-> message codec: plain msgpack, no ext types, never pickle.

Every message is a map::

    {"schema": cls.SCHEMA, "version": SCHEMA_VERSION, "data": {field: value, ...}}

Tensors and arrays are maps ``{"__nd__": True, "dtype": "<f4", "shape": [...],
"data": <raw bytes>}`` with a little-endian numpy dtype string; a nested
message (ScoredBatch.rollout) is its bare field map. Encoding and decoding
follow the dataclass type hints, so the wire layout is exactly the fields of
messages.py, and decoding restores the same dtypes and bit patterns.

Messages of an older schema version decode too: the fields a later version
added (their `since` metadata, messages.py) are absent on the wire and take
their defaults.

`decode` treats its input as untrusted: anything malformed - truncated or
random bytes, a schema version newer than this build's, unknown or unexpected schemas,
missing/extra fields, wrong types, arrays whose byte length disagrees with
dtype x shape, disallowed dtypes, oversized or deeply nested data - raises
CodecError with a message that says what is wrong.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import math
import numbers
import operator
import typing

import msgpack
import numpy as np
import torch

from dgrpo.protocols.messages import MESSAGE_TYPES, SCHEMA_VERSION, RolloutRequest

MAX_ARRAY_BYTES = 1 << 30  # total array payload one message may carry
MAX_MESSAGE_BYTES = MAX_ARRAY_BYTES + (64 << 20)  # arrays plus generous room for everything else
MAX_DEPTH = 32  # real messages nest 6 levels deep
MAX_NDIM = 32
MAX_CONTAINER_LEN = 1 << 20  # entries in one msgpack map or array
MAX_STR_LEN = 1 << 20

# Little-endian (or byte-order-free) numpy dtype strings allowed on the wire.
ALLOWED_DTYPES = {
    "|b1": "bool", "|i1": "int8", "<i2": "int16", "<i4": "int32", "<i8": "int64",
    "|u1": "uint8", "<f2": "float16", "<f4": "float32", "<f8": "float64",
}
_TORCH_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                 torch.float16, torch.float32, torch.float64)
_ND_KEYS = {"__nd__", "dtype", "shape", "data"}
_ENVELOPE_KEYS = {"schema", "version", "data"}
_REGISTRY = {cls.SCHEMA: cls for cls in MESSAGE_TYPES}


class CodecError(ValueError):
    """Bytes that are not a valid message of this build's schema, or a message that cannot be encoded."""


def _allowed() -> str:
    return ", ".join(ALLOWED_DTYPES.values())


def _kind(x: object) -> str:
    return type(x).__name__


@functools.cache
def _field_hints(cls: type, version: int = SCHEMA_VERSION) -> dict[str, object]:
    """The fields of `cls` on the wire of schema `version`, with their type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("since", 1) <= version}


class _Budget:
    """Running total of array bytes in one message."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, nbytes: int, where: str) -> None:
        self.used += nbytes
        if self.used > MAX_ARRAY_BYTES:
            raise CodecError(f"{where}: message carries more than {MAX_ARRAY_BYTES} bytes of arrays, "
                             "the limit a receiver accepts; send smaller batches")


# ---------------------------------------------------------------------------
# encode


def _encode_array(arr: np.ndarray, where: str, budget: _Budget) -> dict:
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if arr.dtype.str not in ALLOWED_DTYPES:
        raise CodecError(f"{where}: dtype {arr.dtype} cannot be sent (allowed: {_allowed()}); "
                         "convert it first, e.g. .astype(np.float32)")
    budget.take(arr.nbytes, where)
    return {"__nd__": True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}


def _encode_tensor(t: object, where: str, budget: _Budget) -> dict:
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{where} must be a torch.Tensor, got {_kind(t)}")
    if t.dtype not in _TORCH_DTYPES:
        raise CodecError(f"{where}: tensor dtype {t.dtype} cannot be sent (allowed: {_allowed()}); "
                         "convert it first, e.g. .float()")
    return _encode_array(t.detach().cpu().contiguous().numpy(), where, budget)


def _encode_value(hint: object, value: object, where: str, budget: _Budget) -> object:
    if hint is bool:
        if not isinstance(value, bool):
            raise CodecError(f"{where} must be a bool, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool):
            raise CodecError(f"{where} must be an int, got bool")
        try:
            value = operator.index(value)
        except TypeError:
            raise CodecError(f"{where} must be an int, got {_kind(value)}") from None
        if not -(1 << 63) <= value < (1 << 64):
            raise CodecError(f"{where} = {value} does not fit in 64 bits")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise CodecError(f"{where} must be a float, got {_kind(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise CodecError(f"{where} must be a str, got {_kind(value)}")
        if len(value) > MAX_STR_LEN:
            raise CodecError(f"{where} is a string of {len(value)} characters, more than {MAX_STR_LEN}")
        return value
    if hint is torch.Tensor:
        return _encode_tensor(value, where, budget)
    if hint in _REGISTRY.values():
        if not isinstance(value, hint):
            raise CodecError(f"{where} must be a {hint.__name__}, got {_kind(value)}")
        return _encode_fields(value, where, budget)
    if typing.get_origin(hint) is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise CodecError(f"{where} must be a dict, got {_kind(value)}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise CodecError(f"{where} keys must be str, got {_kind(k)} key {k!r}")
            if value_hint is np.ndarray:
                if not isinstance(v, np.ndarray):
                    raise CodecError(f"{where}[{k!r}] must be a numpy array, got {_kind(v)}")
                out[k] = _encode_array(v, f"{where}[{k!r}]", budget)
            else:
                out[k] = _encode_value(value_hint, v, f"{where}[{k!r}]", budget)
        return out
    raise TypeError(f"codec has no wire format for type hint {hint!r} at {where}")  # a bug in messages.py


def _encode_fields(msg: object, where: str, budget: _Budget) -> dict:
    return {name: _encode_value(hint, getattr(msg, name), f"{where}.{name}", budget)
            for name, hint in _field_hints(type(msg)).items()}


def encode(msg: object) -> bytes:
    """Serialize one message (any class in messages.MESSAGE_TYPES) to bytes."""
    cls = type(msg)
    if _REGISTRY.get(getattr(cls, "SCHEMA", None)) is not cls:
        raise CodecError(f"cannot encode a {cls.__name__}: not a dgrpo message "
                         f"(expected one of {', '.join(c.__name__ for c in MESSAGE_TYPES)})")
    envelope = {"schema": cls.SCHEMA, "version": SCHEMA_VERSION,
                "data": _encode_fields(msg, cls.__name__, _Budget())}
    try:
        return msgpack.packb(envelope, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(f"cannot encode {cls.__name__}: {exc}") from None


# ---------------------------------------------------------------------------
# decode


def _check_depth(obj: object) -> None:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CodecError(f"message nests deeper than {MAX_DEPTH} levels; it is corrupt or not a dgrpo message")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _decode_array(wire: object, where: str, budget: _Budget) -> np.ndarray:
    if not isinstance(wire, dict) or set(wire) != _ND_KEYS or wire["__nd__"] is not True:
        raise CodecError(f"{where}: expected an array map with keys {sorted(_ND_KEYS)}, got {_kind(wire)}"
                         + (f" with keys {sorted(map(str, wire))}" if isinstance(wire, dict) else ""))
    dtype, shape, data = wire["dtype"], wire["shape"], wire["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise CodecError(f"{where}: array dtype {dtype!r} is not allowed (allowed: "
                         f"{', '.join(ALLOWED_DTYPES)}); the sender must convert it before sending")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_ARRAY_BYTES
                       for d in shape)):
        raise CodecError(f"{where}: array shape must be a list of at most {MAX_NDIM} non-negative ints, "
                         f"got {_kind(shape)} {shape!r:.80}")
    if not isinstance(data, bytes):
        raise CodecError(f"{where}: array data must be bytes, got {_kind(data)}")
    needed = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != needed:
        raise CodecError(f"{where}: array data is {len(data)} bytes but dtype {dtype} x shape {shape} "
                         f"needs {needed}; the message is corrupt")
    budget.take(len(data), where)
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # copy: writable, owns its memory


def _decode_value(hint: object, wire: object, where: str, budget: _Budget, version: int) -> object:
    if hint is bool:
        if not isinstance(wire, bool):
            raise CodecError(f"{where} must be a bool, got {_kind(wire)}")
        return wire
    if hint is int:
        if isinstance(wire, bool) or not isinstance(wire, int):
            raise CodecError(f"{where} must be an int, got {_kind(wire)}")
        return wire
    if hint is float:
        if isinstance(wire, bool) or not isinstance(wire, (int, float)):
            raise CodecError(f"{where} must be a float, got {_kind(wire)}")
        return float(wire)
    if hint is str:
        if not isinstance(wire, str):
            raise CodecError(f"{where} must be a str, got {_kind(wire)}")
        return wire
    if hint is torch.Tensor:
        return torch.from_numpy(_decode_array(wire, where, budget))
    if hint in _REGISTRY.values():
        return _decode_fields(hint, wire, where, budget, version)
    if typing.get_origin(hint) is dict:
        _, value_hint = typing.get_args(hint)
        if not isinstance(wire, dict):
            raise CodecError(f"{where} must be a map, got {_kind(wire)}")
        out = {}
        for k, v in wire.items():
            if not isinstance(k, str):
                raise CodecError(f"{where} keys must be str, got {_kind(k)}")
            if value_hint is np.ndarray:
                out[k] = _decode_array(v, f"{where}[{k!r}]", budget)
            else:
                out[k] = _decode_value(value_hint, v, f"{where}[{k!r}]", budget, version)
        return out
    raise TypeError(f"codec has no wire format for type hint {hint!r} at {where}")  # a bug in messages.py


def _decode_fields(cls: type, wire: object, where: str, budget: _Budget, version: int) -> object:
    if not isinstance(wire, dict):
        raise CodecError(f"{where}: expected a map of fields, got {_kind(wire)}")
    hints = _field_hints(cls, version)
    missing = [name for name in hints if name not in wire]
    extra = [str(k) for k in wire if k not in hints]
    if missing or extra:
        raise CodecError(f"{where}: missing fields {missing}, unexpected fields {extra}; "
                         "sender and receiver run different dgrpo builds, or the data is corrupt")
    return cls(**{name: _decode_value(hint, wire[name], f"{where}.{name}", budget, version)
                  for name, hint in hints.items()})


def decode(data: bytes, expected: type | None = None) -> object:
    """Parse bytes from `encode`; with `expected`, insist on that message class."""
    if expected is not None and expected not in MESSAGE_TYPES:
        raise TypeError(f"expected must be one of {[c.__name__ for c in MESSAGE_TYPES]}, got {expected!r}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"decode() needs bytes, got {_kind(data)}")
    if len(data) > MAX_MESSAGE_BYTES:
        raise CodecError(f"message is {len(data)} bytes, above the {MAX_MESSAGE_BYTES}-byte limit; "
                         "it is corrupt or was not written by dgrpo")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=MAX_STR_LEN, max_bin_len=MAX_ARRAY_BYTES,
                              max_array_len=MAX_CONTAINER_LEN, max_map_len=MAX_CONTAINER_LEN,
                              max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types; report them all the same way
        raise CodecError(f"not a valid dgrpo message: cannot parse {len(data)} bytes as msgpack "
                         f"({type(exc).__name__}: {exc}); the data is truncated, corrupt or over the size limits") from None
    _check_depth(obj)
    if not isinstance(obj, dict):
        raise CodecError(f"not a dgrpo message: top level is {_kind(obj)}, expected a map with keys "
                         f"{sorted(_ENVELOPE_KEYS)}")
    if set(obj) != _ENVELOPE_KEYS:
        raise CodecError(f"not a dgrpo message: top-level keys are {sorted(map(str, obj))}, "
                         f"expected {sorted(_ENVELOPE_KEYS)}")
    schema, version = obj["schema"], obj["version"]
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise CodecError(f"{schema!r:.60} message written by schema version {version!r:.20}, this build reads "
                         f"versions 1 to {SCHEMA_VERSION}; upgrade dgrpo or re-generate the file")
    cls = _REGISTRY.get(schema) if isinstance(schema, str) else None
    if cls is None:
        raise CodecError(f"unknown message schema {schema!r:.60}; this build knows {sorted(_REGISTRY)}")
    if expected is not None and cls is not expected:
        raise CodecError(f"expected a {expected.__name__} ({expected.SCHEMA!r}) message, "
                         f"got a {cls.__name__} ({cls.SCHEMA!r})")
    return _decode_fields(cls, obj["data"], cls.__name__, _Budget(), version)


def _pickle_request(request: RolloutRequest) -> tuple:
    """A request is pickled (as Ray sends it to a worker, every worker every step) as the codec's bytes, which
    cost a fraction of pickling its tensor to make and to read."""
    return decode, (encode(request), RolloutRequest)


copyreg.pickle(RolloutRequest, _pickle_request)
