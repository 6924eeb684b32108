"""Request and response bodies: JSON and msgpack, with numpy arrays in both; never pickle.

JSON carries arrays as nested lists, or as ``{"dtype", "shape", "b64"}`` (raw little-endian
C-order bytes) for images. msgpack carries arrays as ndarray maps
``{"__ndarray__": True, "data": <bytes>, "dtype": "<f4", "shape": [...]}``; the map written by
the msgpack-numpy package (``{b"nd": True, b"type", b"kind", b"shape", b"data"}``) is read too,
so clients that use it need nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import msgpack
import numpy as np
from numpy.typing import DTypeLike

JSON = "application/json"
MSGPACK = "application/msgpack"
_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})

MAX_ELEMENTS = 10_000_000
MAX_NDIM = 32
ALLOWED_DTYPES = tuple(
    np.dtype(t)
    for t in (
        "bool",
        "uint8",
        "uint16",
        "uint32",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "float32",
        "float64",
    )
)
_B64_KEYS = frozenset({"dtype", "shape", "b64"})
_NDARRAY_KEYS = frozenset({"__ndarray__", "data", "dtype", "shape"})
_MSGPACK_NUMPY_KEYS = frozenset({b"nd", b"type", b"kind", b"shape", b"data"})
_MSGPACK_NUMPY_SCALAR_KEYS = frozenset({b"nd", b"type", b"data"})
# openpi-client's msgpack-numpy: the ndarray map with bytes keys, and numpy scalars.
_OPENPI_KEYS = frozenset({b"__ndarray__", b"data", b"dtype", b"shape"})
_OPENPI_SCALAR_KEYS = frozenset({b"__npgeneric__", b"data", b"dtype"})


class CodecError(ValueError):
    """A body or an array in it cannot be read; the message says what and where."""


# --- content types -----------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """The bare media type, lower case, without parameters such as ``charset``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def _kind(content_type: str | None) -> str | None:
    """MSGPACK or JSON for a supported content type (missing means JSON), else None."""
    mt = media_type(content_type)
    if mt in _MSGPACK_TYPES:
        return MSGPACK
    if mt in ("", JSON) or mt.endswith("+json"):
        return JSON
    return None


def _accept_q(accept: str) -> dict[str, float]:
    """The best quality the Accept header gives to JSON and to msgpack (only explicit ones)."""
    q = {JSON: 0.0, MSGPACK: 0.0}
    for item in accept.split(","):
        mt, *params = (p.strip() for p in item.split(";"))
        kind = _kind(mt) if mt else None
        if kind is None:
            continue
        quality = 1.0
        for p in params:
            key, _, val = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(val)
                except ValueError:
                    quality = 0.0
        q[kind] = max(q[kind], quality)
    return q


def negotiate(accept: str | None, request_content_type: str | None) -> str:
    """The response content type: msgpack when Accept asks for it, JSON when Accept asks only
    for JSON, otherwise the request's own encoding (JSON when that is missing or unknown)."""
    if accept:
        q = _accept_q(accept)
        if q[MSGPACK] > 0 and q[MSGPACK] >= q[JSON]:
            return MSGPACK
        if q[JSON] > 0:
            return JSON
    return MSGPACK if _kind(request_content_type) == MSGPACK else JSON


# --- arrays ------------------------------------------------------------------------------


def _check_dtype(dt: np.dtype, name: str) -> None:
    native = dt.newbyteorder("=")
    if dt.fields is not None or dt.subdtype is not None or native not in ALLOWED_DTYPES:
        allowed = ", ".join(d.name for d in ALLOWED_DTYPES)
        raise CodecError(f"{name}: unsupported dtype {dt.str!r} (allowed: {allowed})")


def _parse_dtype(spec: Any, name: str) -> np.dtype:
    """A dtype from its name or code; bytes without an explicit order are little-endian."""
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", "replace")
    if not isinstance(spec, str):
        raise CodecError(f"{name}: dtype must be a string such as 'uint8' or '<f4'")
    try:
        dt = np.dtype(spec)
    except (TypeError, ValueError, SyntaxError) as e:
        raise CodecError(f"{name}: unknown dtype {spec!r}") from e
    _check_dtype(dt, name)
    return dt.newbyteorder("<") if dt.byteorder == "=" else dt


def _parse_shape(shape: Any, name: str) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise CodecError(f"{name}: shape must be a list of non-negative integers")
    if len(shape) > MAX_NDIM:
        raise CodecError(f"{name}: {len(shape)} dimensions (at most {MAX_NDIM})")
    if any(d < 0 for d in shape):
        raise CodecError(f"{name}: negative dimension in shape {list(shape)}")
    _check_size(math.prod(shape), name)
    return tuple(shape)


def _check_size(n: int, name: str) -> None:
    if n > MAX_ELEMENTS:
        raise CodecError(f"{name}: {n} elements (at most {MAX_ELEMENTS})")


def _from_buffer(data: Any, dtype: Any, shape: Any, name: str) -> np.ndarray:
    """A writable native-order array from raw C-order bytes, checked against dtype × shape."""
    dt = _parse_dtype(dtype, name)
    dims = _parse_shape(shape, name)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"{name}: array data must be bytes")
    expected = math.prod(dims) * dt.itemsize
    if len(data) != expected:
        raise CodecError(
            f"{name}: {len(data)} bytes of data, but dtype {dt.name} × shape {list(dims)} "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def _from_b64(value: dict, name: str) -> np.ndarray:
    if set(value) != _B64_KEYS:
        raise CodecError(f"{name}: an encoded array has exactly the keys dtype, shape and b64")
    text = value["b64"]
    if not isinstance(text, str):
        raise CodecError(f"{name}: b64 must be a base64 string")
    # Shape and dtype first, so that an oversized array is refused before it is decoded.
    _parse_dtype(value["dtype"], name)
    _parse_shape(value["shape"], name)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CodecError(f"{name}: invalid base64 ({e})") from e
    return _from_buffer(data, value["dtype"], value["shape"], name)


def _from_ndarray_map(value: dict, name: str) -> np.ndarray | np.generic | None:
    """The array an ndarray map stands for, or None when the dict is not one."""
    keys = set(value)
    if keys == _NDARRAY_KEYS and value["__ndarray__"] is True:
        return _from_buffer(value["data"], value["dtype"], value["shape"], name)
    if keys == _MSGPACK_NUMPY_KEYS and value[b"nd"] is True:
        return _from_buffer(value[b"data"], value[b"type"], value[b"shape"], name)
    if keys == _MSGPACK_NUMPY_SCALAR_KEYS and value[b"nd"] is False:
        return _from_buffer(value[b"data"], value[b"type"], [], name)[()]
    if keys == _OPENPI_KEYS and value[b"__ndarray__"] is True:
        return _from_buffer(value[b"data"], value[b"dtype"], value[b"shape"], name)
    if keys == _OPENPI_SCALAR_KEYS and value[b"__npgeneric__"] is True:
        if not isinstance(value[b"data"], bool | int | float):
            raise CodecError(f"{name}: a numpy scalar's data must be a number")
        return np.asarray(value[b"data"], _parse_dtype(value[b"dtype"], name))[()]
    return None


def to_array(value: Any, name: str, dtype: DTypeLike | None = np.float32) -> np.ndarray:
    """Any accepted array form (nested list, number, b64 map, ndarray map, decoded array) as a
    numpy array cast to ``dtype`` (``None`` keeps the sent dtype); errors name the field."""
    if value is None:
        raise CodecError(f"{name}: expected an array, got null")
    if isinstance(value, bytes | bytearray | memoryview | str):
        raise CodecError(f"{name}: expected an array, got {type(value).__name__}")
    if isinstance(value, dict):
        arr = _from_ndarray_map(value, name)
        if arr is None:
            if "b64" not in value:
                raise CodecError(
                    f"{name}: expected a nested list, a number, or {{dtype, shape, b64}}"
                )
            arr = _from_b64(value, name)
        arr = np.asarray(arr)
    else:
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise CodecError(f"{name}: ragged or malformed nested list ({e})") from e
        if arr.dtype == object:
            raise CodecError(f"{name}: ragged nested list or non-numeric entries")
        if arr.dtype.kind in "USVMm":
            raise CodecError(f"{name}: non-numeric entries ({arr.dtype.kind!r} data)")
        if arr.ndim > MAX_NDIM:
            raise CodecError(f"{name}: {arr.ndim} dimensions (at most {MAX_NDIM})")
        _check_size(arr.size, name)
        _check_dtype(arr.dtype, name)
    if dtype is None:
        return arr
    return arr.astype(dtype, copy=False)


# --- bodies ------------------------------------------------------------------------------


def _ndarray_hook(obj: dict) -> Any:
    arr = _from_ndarray_map(obj, "msgpack ndarray")
    return obj if arr is None else arr


def _no_ext(code: int, data: bytes) -> Any:
    raise CodecError(f"msgpack extension type {code} is not supported")


def _to_ndarray_map(arr: np.ndarray) -> dict[str, Any]:
    _check_dtype(arr.dtype, "array")
    little = arr.dtype.newbyteorder("<") if arr.dtype.byteorder in "=>" else arr.dtype
    data = np.ascontiguousarray(arr, dtype=little).tobytes()
    return {"__ndarray__": True, "data": data, "dtype": little.str, "shape": list(arr.shape)}


def _as_numpy(obj: Any, encoding: str) -> np.ndarray | np.generic:
    """numpy arrays and scalars as they are; other array-likes (JAX arrays) through their
    ``__array__``."""
    if isinstance(obj, np.ndarray | np.generic):
        return obj
    if hasattr(obj, "__array__"):
        return np.asarray(obj)
    raise TypeError(f"cannot encode {type(obj).__name__} as {encoding}")


def _msgpack_default(obj: Any) -> Any:
    arr = _as_numpy(obj, "msgpack")
    # Scalars are numbers for the client; only arrays carry dtype and shape.
    return arr.item() if isinstance(arr, np.generic) else _to_ndarray_map(arr)


def _openpi_default(obj: Any) -> Any:
    arr = _as_numpy(obj, "msgpack")
    if isinstance(arr, np.generic):
        return arr.item()
    fields = _to_ndarray_map(arr)
    return {b"__ndarray__": True, b"data": fields["data"], b"dtype": fields["dtype"],
            b"shape": fields["shape"]}  # fmt: skip


def encode_openpi(obj: Any) -> bytes:
    """``obj`` as openpi-client's msgpack-numpy reads it: arrays as ndarray maps with bytes
    keys, which its unpacker turns back into arrays."""
    try:
        return msgpack.packb(obj, default=_openpi_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode response as msgpack: {e}") from e


def _json_default(obj: Any) -> Any:
    arr = _as_numpy(obj, "JSON")
    return arr.item() if isinstance(arr, np.generic) else arr.tolist()


def _no_constant(name: str) -> Any:
    raise CodecError(f"malformed JSON body: {name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # such as 1e400, which Python reads as Inf
        raise CodecError(f"malformed JSON body: {text[:40]} is beyond float64's range")
    return x


def decode_body(body: bytes, content_type: str | None) -> Any:
    """The body as Python data (msgpack ndarray maps become numpy arrays); an empty body is
    None, so that a caller can tell "no body" from an empty object."""
    kind = _kind(content_type)
    if kind is None:
        raise CodecError(
            f"unsupported content type {media_type(content_type)!r}: send {JSON} or {MSGPACK}"
        )
    if not body.strip():
        return None
    if kind == JSON:
        try:  # NaN, Infinity and overflowing numbers are refused: JSON has none of them
            return json.loads(body, parse_constant=_no_constant, parse_float=_finite_float)
        except CodecError:
            raise
        except (ValueError, RecursionError) as e:
            raise CodecError(f"malformed JSON body: {e}") from e
    try:
        return msgpack.unpackb(body, raw=False, object_hook=_ndarray_hook, ext_hook=_no_ext)
    except CodecError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as e:
        raise CodecError(f"malformed msgpack body: {type(e).__name__}: {e}") from e


def encode_body(obj: Any, content_type: str) -> bytes:
    """``obj`` in the given encoding; numpy arrays become lists (JSON) or ndarray maps
    (msgpack), numpy scalars become numbers. Non-finite floats are refused in JSON, which
    has no spelling for them."""
    kind = _kind(content_type)
    if kind is None:
        raise CodecError(f"cannot encode as {media_type(content_type)!r}: use {JSON} or {MSGPACK}")
    try:
        if kind == JSON:
            text = json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":"))
            return text.encode()
        return msgpack.packb(obj, default=_msgpack_default, use_bin_type=True)
    except CodecError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode response as {kind}: {e}") from e
