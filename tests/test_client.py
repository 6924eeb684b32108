"""The clients' retry rule: which answers are retried, how long they wait, when they stop."""

import time

import httpx
import pytest

from service.clients.client import Client, Options
from service.clients.local import free_port


def answer(status: int, **headers) -> httpx.Response:
    return httpx.Response(status, headers=headers)


def test_final_answers_are_not_retried():
    opts = Options("http://x", retries=3)
    for status in (200, 201, 400, 404, 409, 410, 422):
        assert opts.retry_delay(0, answer(status)) is None


def test_busy_answers_are_retried_with_backoff_or_retry_after_until_the_budget_ends():
    opts = Options("http://x", retries=3, backoff=0.1)
    assert [opts.retry_delay(a, answer(503)) for a in range(4)] == [0.1, 0.2, 0.4, None]
    assert opts.retry_delay(0, answer(429, **{"Retry-After": "2"})) == 2.0
    assert opts.retry_delay(1, None) == 0.2  # lost in transport
    assert Options("http://x", retries=0).retry_delay(0, answer(504)) is None


def test_a_lost_server_is_retried_then_reported():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, retries=2, backoff=0.05) as client:
        started = time.perf_counter()
        with pytest.raises(httpx.ConnectError):
            client.model()
    assert time.perf_counter() - started >= 0.05 + 0.1  # two waits before giving up
