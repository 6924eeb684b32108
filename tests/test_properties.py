"""Property tests (hypothesis) of the codecs and of validation: whatever a client sends,
the answer is a clear error or a value, never a crash, and a refused request leaves the
session's stored record (step, LSTM state, Δφ) byte for byte as it was.

Example counts are bounded so that the suite stays fast."""

import base64
import contextlib
import json
import struct

import httpx
import msgpack
import numpy as np
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.clients.local import running_server
from service.codec import ALLOWED_DTYPES, JSON, MSGPACK, CodecError, decode_body, to_array
from service.settings import Settings

OBS = [0.5, -0.5, 0.1, 0.0]
FAST = settings(max_examples=60, deadline=None, derandomize=True, database=None)
SERVED = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)

# --- the codecs alone ----------------------------------------------------------------------

# Integers within msgpack's 64 bits, so that every value can be sent both ways.
ints = st.integers(-(2**63), 2**64 - 1)
json_leaves = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8)
garbage = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


@FAST
@given(st.binary(max_size=256), st.sampled_from([JSON, MSGPACK]))
def test_any_bytes_decode_or_are_a_codec_error(body, kind):
    with contextlib.suppress(CodecError):
        decode_body(body, kind)


@FAST
@given(garbage)
def test_any_nested_value_is_an_array_or_a_codec_error(value):
    try:
        arr = to_array(value, "observation")
    except CodecError as err:
        assert str(err).startswith("observation")
    else:
        assert arr.dtype == np.float32


@FAST
@given(
    hnp.arrays(
        st.sampled_from(ALLOWED_DTYPES),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    )
)
def test_arrays_survive_msgpack_exactly(arr):
    body = msgpack.packb({"x": arr}, default=lambda a: _ndarray_map(a))
    got = decode_body(body, MSGPACK)["x"]
    assert got.dtype == arr.dtype and got.shape == arr.shape
    assert got.tobytes() == arr.tobytes()


def _ndarray_map(arr: np.ndarray) -> dict:
    little = arr.astype(arr.dtype.newbyteorder("<"))
    return {"__ndarray__": True, "data": little.tobytes(), "dtype": little.dtype.str,
            "shape": list(arr.shape)}  # fmt: skip


def hostile_msgpack() -> st.SearchStrategy[bytes]:
    """Truncations of a valid body, huge declared lengths, deep nesting, extension types."""
    valid = msgpack.packb({"session_id": "s", "observation": OBS, "step": 0})
    truncated = st.integers(1, len(valid) - 1).map(lambda n: valid[:n])
    huge = st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6"]).flatmap(
        lambda head: st.integers(2**20, 2**32 - 1).map(lambda n: head + struct.pack(">I", n))
    )
    deep = st.integers(100, 5000).map(lambda depth: b"\x91" * depth + b"\x00")
    ext = st.tuples(st.integers(0, 127), st.binary(max_size=16)).map(
        lambda t: msgpack.packb({"observation": msgpack.ExtType(*t)})
    )
    # fixext 4 of type -1: the timestamp extension, which msgpack reads by itself
    timestamp = st.binary(min_size=4, max_size=4).map(
        lambda b: b"\x82\xaasession_id\xa1s\xabobservation\xd6\xff" + b
    )
    return truncated | huge | deep | ext | timestamp


@FAST
@given(hostile_msgpack())
def test_hostile_msgpack_is_a_codec_error_or_harmless(body):
    try:
        value = decode_body(body, MSGPACK)
    except CodecError:
        return
    to_array_or_error(value)


def to_array_or_error(value):
    with contextlib.suppress(CodecError):
        to_array(value, "observation")


# --- validation through a real server --------------------------------------------------------

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(trained, redis_url):
    settings = Settings(
        model_dir=trained.run_dir, session_store="redis", redis_url=redis_url,
        batch_sizes=(1,), max_batch=1, sample_counts=(), max_body_bytes=MAX_BODY,
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


@pytest.fixture(scope="module")
def victim(server, redis_url):
    """(client, session id, its record now, its record after one step with a Δφ)."""
    c = httpx.Client(base_url=server, timeout=60)
    body = {"seed": 1, "planner": {"planner": "online_adaptation"}}
    sid = c.post("/sessions", json=body).json()["session_id"]
    assert c.post("/act", json={"session_id": sid, "observation": OBS}).status_code == 200
    r = redis.Redis.from_url(redis_url)
    record = lambda: r.get(f"worldplan:session:{sid}")  # noqa: E731
    yield c, sid, record, record()
    c.close()
    r.close()


def beyond_float32() -> st.SearchStrategy[float]:
    big = st.floats(3.5e38, 1e300) | st.floats(-1e300, -3.5e38)
    return big | st.sampled_from([float("nan"), float("inf"), float("-inf")])


def bad_observations() -> st.SearchStrategy:
    """Observations the bundle (shape [4], float32) must refuse."""
    wrong_shape = hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6).filter(
            lambda s: s != (4,)
        ),
        elements=st.floats(-10, 10, width=32),
    )
    non_finite = st.tuples(
        st.integers(0, 3), beyond_float32(), st.lists(st.floats(-1, 1), min_size=4, max_size=4)
    ).map(lambda t: np.asarray([t[1] if i == t[0] else x for i, x in enumerate(t[2])]))
    wrong_dtype = st.sampled_from(["complex64", "uint64", "object", "U4", "datetime64[s]"]).map(
        lambda dt: {"dtype": dt, "shape": [4], "b64": base64.b64encode(bytes(32)).decode()}
    )
    huge = st.integers(MAX_BODY, 2**31).map(lambda n: {"dtype": "float32", "shape": [n], "b64": ""})
    empty = st.sampled_from([[], [[]], {}, "", None])
    nested = garbage.filter(lambda g: not _is_valid_obs(g))
    return wrong_shape | non_finite | wrong_dtype | huge | empty | nested


def _is_valid_obs(value) -> bool:
    try:
        arr = to_array(value, "o")
    except CodecError:
        return False
    return arr.shape == (4,) and bool(np.all(np.isfinite(arr)))


def encode(sid: str, observation, as_msgpack: bool) -> tuple[bytes, str]:
    body = {"session_id": sid, "observation": observation}
    if as_msgpack:
        default = lambda a: _ndarray_map(np.asarray(a))  # noqa: E731
        return msgpack.packb(body, default=default), MSGPACK
    if isinstance(observation, np.ndarray):
        body["observation"] = observation.tolist()
    return json.dumps(body, allow_nan=True).encode(), JSON


def assert_refused_and_unchanged(victim, response) -> None:
    _, _, record, before = victim
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["code"]  # the error shape
    assert record() == before


@SERVED
@given(bad_observations(), st.booleans())
def test_bad_observations_are_4xx_and_change_nothing(victim, observation, as_msgpack):
    c, sid, _, _ = victim
    content, kind = encode(sid, observation, as_msgpack)
    r = c.post("/act", content=content, headers={"Content-Type": kind})
    assert_refused_and_unchanged(victim, r)


@SERVED
@given(hostile_msgpack() | st.binary(max_size=64))
def test_hostile_bodies_are_4xx_and_change_nothing(victim, body):
    c, sid, _, _ = victim
    r = c.post("/act", content=body, headers={"Content-Type": MSGPACK})
    assert_refused_and_unchanged(victim, r)


@SERVED
@given(
    st.fixed_dictionaries(
        {"step": st.integers(2, 2**63) | st.integers(-(2**63), -1) | st.text(max_size=3)},
        optional={
            "reset": garbage,
            "planner": st.dictionaries(
                st.sampled_from(["planner", "kl_coef", "guidance_scale", "n_adaptation_samples"]),
                garbage | beyond_float32(),
                min_size=1,
            ),
            "deadline_ms": beyond_float32() | st.floats(max_value=0),
        },
    )
)
def test_bad_fields_beside_a_good_observation_change_nothing(victim, fields):
    c, sid, _, _ = victim
    body = {"session_id": sid, "observation": OBS, **fields}
    content = msgpack.packb(body)
    r = c.post("/act", content=content, headers={"Content-Type": MSGPACK})
    assert_refused_and_unchanged(victim, r)


@SERVED
@given(st.integers(MAX_BODY + 1, 4 * MAX_BODY), st.sampled_from([JSON, MSGPACK]))
def test_oversize_bodies_are_413_and_change_nothing(victim, size, kind):
    c, sid, _, _ = victim
    r = c.post("/act", content=b"\x00" * size, headers={"Content-Type": kind})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert_refused_and_unchanged(victim, r)
