"""Body encodings: arrays through JSON and msgpack, the b64 form, errors that name the field."""

import base64
import json
import pickle

import msgpack
import numpy as np
import pytest

from service.codec import (
    ALLOWED_DTYPES,
    JSON,
    MAX_ELEMENTS,
    MSGPACK,
    CodecError,
    decode_body,
    encode_body,
    negotiate,
    to_array,
)

RNG = np.random.default_rng(0)
UNPICKLED: list[str] = []


def _arrays() -> dict[str, np.ndarray]:
    out = {}
    for dt in ALLOWED_DTYPES:
        if dt.kind == "b":
            a = RNG.random((2, 3)) > 0.5
        elif dt.kind in "iu":
            info = np.iinfo(dt)
            a = RNG.integers(info.min, info.max, size=(2, 3), dtype=dt, endpoint=True)
        else:
            a = RNG.standard_normal((2, 3)).astype(dt)
        out[dt.name] = a.astype(dt)
    return out


def _b64(a: np.ndarray) -> dict:
    le = a.astype(a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.name, "shape": list(a.shape), "b64": base64.b64encode(le).decode()}


def _mark(tag: str) -> None:
    UNPICKLED.append(tag)


class Evil:
    def __reduce__(self):
        return (_mark, ("executed",))


# --- round trips ---------------------------------------------------------------------------


def test_msgpack_round_trip_keeps_every_dtype_exactly():
    arrays = _arrays()
    obj = {"arrays": arrays, "nested": [{"x": arrays["float32"]}], "n": 3, "s": "hi", "z": None}
    back = decode_body(encode_body(obj, MSGPACK), MSGPACK)
    assert set(back["arrays"]) == set(arrays)
    for name, a in arrays.items():
        b = back["arrays"][name]
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
        assert b.flags.writeable
    np.testing.assert_array_equal(back["nested"][0]["x"], arrays["float32"])
    assert (back["n"], back["s"], back["z"]) == (3, "hi", None)


def test_json_round_trip_gives_lists_that_to_array_restores():
    arrays = _arrays()
    back = decode_body(encode_body({"arrays": arrays}, JSON), JSON)
    for name, a in arrays.items():
        assert isinstance(back["arrays"][name], list)
        np.testing.assert_array_equal(to_array(back["arrays"][name], name, dtype=a.dtype), a)


def test_numpy_scalars_become_plain_numbers():
    obj = {"f": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True), "d": np.float64(2.0)}
    for ct in (JSON, MSGPACK):
        back = decode_body(encode_body(obj, ct), ct)
        assert back == {"f": 1.5, "i": 7, "b": True, "d": 2.0}
        assert type(back["i"]) is int and type(back["b"]) is bool


def test_array_likes_are_encoded_through_their_array_interface():
    class ArrayLike:  # stands for a JAX array
        def __array__(self, dtype=None, copy=None):
            return np.arange(3, dtype=np.int16)

    assert decode_body(encode_body({"a": ArrayLike()}, JSON), JSON) == {"a": [0, 1, 2]}
    back = decode_body(encode_body({"a": ArrayLike()}, MSGPACK), MSGPACK)["a"]
    assert back.dtype == np.int16
    np.testing.assert_array_equal(back, [0, 1, 2])


def test_zero_dim_empty_and_non_contiguous_arrays():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    obj = {"t": a.T, "e": np.zeros((0, 5), np.int16), "s": np.array(3.5, np.float64)}
    back = decode_body(encode_body(obj, MSGPACK), MSGPACK)
    np.testing.assert_array_equal(back["t"], a.T)
    assert back["e"].shape == (0, 5) and back["e"].dtype == np.int16
    assert back["s"].shape == () and back["s"] == 3.5


def test_big_endian_arrays_are_sent_little_endian_and_read_back_native():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    packed = msgpack.unpackb(encode_body({"a": a}, MSGPACK), raw=False)
    assert packed["a"]["dtype"] == "<f4"
    back = decode_body(encode_body({"a": a}, MSGPACK), MSGPACK)["a"]
    assert back.dtype == np.float32 and back.dtype.isnative
    np.testing.assert_array_equal(back, a)


def test_b64_form_reads_every_dtype():
    for name, a in _arrays().items():
        np.testing.assert_array_equal(to_array(_b64(a), name, dtype=None), a)


def test_b64_image_through_a_json_body():
    img = RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    body = json.dumps({"observation": _b64(img)}).encode()
    obs = decode_body(body, "application/json; charset=utf-8")["observation"]
    np.testing.assert_array_equal(to_array(obs, "observation", dtype=None), img)
    as_float = to_array(obs, "observation")
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, img.astype(np.float32))


def test_msgpack_and_json_give_identical_observations():
    obs = RNG.standard_normal((4, 7)).astype(np.float32)
    via_json = decode_body(json.dumps({"observation": obs.tolist()}).encode(), JSON)
    via_b64 = decode_body(json.dumps({"observation": _b64(obs)}).encode(), None)
    via_msgpack = decode_body(encode_body({"observation": obs}, MSGPACK), MSGPACK)
    arrays = [to_array(b["observation"], "observation") for b in (via_json, via_b64, via_msgpack)]
    for a in arrays:
        assert a.dtype == np.float32 and a.shape == obs.shape
        np.testing.assert_array_equal(a, obs)


def test_msgpack_numpy_maps_are_read():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    nd = {b"nd": True, b"type": "<f4", b"kind": b"", b"shape": (2, 3), b"data": a.tobytes()}
    scalar = {b"nd": False, b"type": "<i8", b"data": np.int64(9).tobytes()}
    body = msgpack.packb({"a": nd, "s": scalar}, use_bin_type=True)
    back = decode_body(body, "application/x-msgpack")
    np.testing.assert_array_equal(back["a"], a)
    assert back["s"] == 9


def test_to_array_accepts_lists_numbers_and_arrays():
    assert to_array(3, "x").shape == () and to_array(3, "x").dtype == np.float32
    assert to_array([[1, 2], [3, 4]], "x", dtype=None).dtype == np.int64
    assert to_array([True, False], "x", dtype=None).dtype == np.bool_
    a = np.ones((2, 2), np.float64)
    assert to_array(a, "x").dtype == np.float32
    assert to_array([], "x").shape == (0,)


def test_empty_body_is_none():
    assert decode_body(b"", JSON) is None
    assert decode_body(b"  \n", None) is None
    assert decode_body(b"", MSGPACK) is None


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[1, 2], [3]], "observation: ragged"),
        ([1, "a"], "observation: non-numeric"),
        ([1, None], "observation: ragged nested list or non-numeric"),
        ([{"a": 1}], "observation: ragged nested list or non-numeric"),
        (None, "observation: expected an array, got null"),
        ("1.5", "observation: expected an array, got str"),
        (b"\x00\x01", "observation: expected an array, got bytes"),
        ({"a": 1}, "observation: expected a nested list, a number"),
        ([1 + 2j], "observation: unsupported dtype"),
        (np.zeros(3, np.uint64), "observation: unsupported dtype '<u8'"),
        (np.array(["a"]), "observation: non-numeric"),
    ],
)
def test_to_array_errors_name_the_field(value, message):
    with pytest.raises(CodecError, match="^" + message.replace("(", r"\(")):
        to_array(value, "observation")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"b64": "not base64!!"}, "image: invalid base64"),
        ({"b64": 5}, "image: b64 must be a base64 string"),
        ({"shape": [2, 2]}, r"image: 6 bytes of data, but dtype uint8 × shape \[2, 2\] needs 4"),
        ({"dtype": "float32"}, r"image: 6 bytes of data, but dtype float32 × shape \[2, 3\]"),
        ({"dtype": "object"}, "image: unsupported dtype '\\|O'"),
        ({"dtype": "uint64"}, "image: unsupported dtype '<u8'"),
        ({"dtype": "complex64"}, "image: unsupported dtype"),
        ({"dtype": "f4,i4"}, "image: unsupported dtype"),
        ({"dtype": "nonsense"}, "image: unknown dtype 'nonsense'"),
        ({"dtype": 3}, "image: dtype must be a string"),
        ({"shape": [2, -3]}, r"image: negative dimension in shape \[2, -3\]"),
        ({"shape": [100_000, 100_000]}, "image: 10000000000 elements"),
        ({"shape": [2.0, 3]}, "image: shape must be a list of non-negative integers"),
        ({"shape": "2,3"}, "image: shape must be a list"),
        ({"shape": [1] * 40}, "image: 40 dimensions"),
        ({"extra": 1}, "image: an encoded array has exactly the keys dtype, shape and b64"),
    ],
)
def test_b64_errors_name_the_field(change, message):
    value = _b64(np.arange(6, dtype=np.uint8).reshape(2, 3)) | change
    with pytest.raises(CodecError, match="^" + message):
        to_array(value, "image")


def test_too_many_elements_in_a_list():
    with pytest.raises(CodecError, match=f"x: {MAX_ELEMENTS + 1} elements"):
        to_array(np.zeros(MAX_ELEMENTS + 1, np.uint8), "x")


def test_bad_ndarray_map_in_msgpack_body():
    bad = {"__ndarray__": True, "data": b"\x00" * 5, "dtype": "<f4", "shape": [2]}
    with pytest.raises(CodecError, match="msgpack ndarray: 5 bytes of data, but dtype float32"):
        decode_body(msgpack.packb({"a": bad}, use_bin_type=True), MSGPACK)
    obj = {"__ndarray__": True, "data": b"\x00" * 8, "dtype": "|O", "shape": [1]}
    with pytest.raises(CodecError, match="msgpack ndarray: unsupported dtype '\\|O'"):
        decode_body(msgpack.packb(obj, use_bin_type=True), MSGPACK)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"{", JSON, "malformed JSON body"),
        (b"\xff\xfe\x00", None, "malformed JSON body"),
        (b'{"a": 1} x', JSON, "malformed JSON body"),
        (b"[" * 100_000, JSON, "malformed JSON body"),
        (b"\xc1", MSGPACK, "malformed msgpack body"),
        (b"\x92\x01", MSGPACK, "malformed msgpack body"),
        (msgpack.packb(1) + b"\x01", MSGPACK, "malformed msgpack body: ExtraData"),
        (msgpack.packb(msgpack.ExtType(5, b"x")), MSGPACK, "msgpack extension type 5"),
        (b"a=1", "application/x-www-form-urlencoded", "unsupported content type"),
        (b"x", "text/plain; charset=utf-8", "unsupported content type 'text/plain'"),
    ],
)
def test_malformed_bodies(body, content_type, message):
    with pytest.raises(CodecError, match=message):
        decode_body(body, content_type)


def test_unsupported_content_type_names_the_supported_ones():
    with pytest.raises(CodecError) as e:
        decode_body(b"<a/>", "application/xml")
    assert JSON in str(e.value) and MSGPACK in str(e.value)


def test_pickle_is_never_executed():
    payload = pickle.dumps({"observation": Evil()})
    for ct in (JSON, MSGPACK, None):
        with pytest.raises(CodecError):
            decode_body(payload, ct)
    # A pickle smuggled inside a valid body stays bytes and is refused as an array.
    body = msgpack.packb({"observation": payload}, use_bin_type=True)
    value = decode_body(body, MSGPACK)["observation"]
    assert isinstance(value, bytes)
    with pytest.raises(CodecError, match="observation: expected an array, got bytes"):
        to_array(value, "observation")
    # So is one dressed as an object array.
    obj = {"__ndarray__": True, "data": payload, "dtype": "|O", "shape": [1]}
    with pytest.raises(CodecError, match="unsupported dtype"):
        decode_body(msgpack.packb({"o": obj}, use_bin_type=True), MSGPACK)
    b64 = {"dtype": "object", "shape": [1], "b64": base64.b64encode(payload).decode()}
    with pytest.raises(CodecError, match="unsupported dtype"):
        to_array(b64, "observation")
    assert UNPICKLED == []


def test_encoding_errors():
    with pytest.raises(CodecError, match="cannot encode response as application/json"):
        encode_body({"x": float("nan")}, JSON)
    with pytest.raises(CodecError, match="cannot encode response as application/json"):
        encode_body({"x": np.array([1.0, np.inf])}, JSON)
    with pytest.raises(CodecError, match="cannot encode"):
        encode_body({"x": object()}, MSGPACK)
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode_body({"x": np.zeros(2, np.complex64)}, MSGPACK)
    with pytest.raises(CodecError, match="cannot encode as 'text/plain'"):
        encode_body({}, "text/plain")


# --- negotiation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "request_type", "expected"),
    [
        (None, None, JSON),
        (None, JSON, JSON),
        (None, MSGPACK, MSGPACK),
        (None, "application/msgpack; foo=bar", MSGPACK),
        ("application/msgpack", JSON, MSGPACK),
        ("application/msgpack", None, MSGPACK),
        ("application/json, application/msgpack;q=0.9", None, JSON),
        ("application/json;q=0.5, application/msgpack", JSON, MSGPACK),
        ("application/json", MSGPACK, JSON),
        ("*/*", MSGPACK, MSGPACK),
        ("*/*", None, JSON),
        ("text/html", "text/plain", JSON),
        ("application/msgpack;q=0", JSON, JSON),
        ("application/x-msgpack", JSON, MSGPACK),
    ],
)
def test_negotiate(accept, request_type, expected):
    assert negotiate(accept, request_type) == expected
