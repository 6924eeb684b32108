"""The short soak of CI: `worldplan loadtest --mix` against a real server whose sessions
expire after 2 s idle. The longer one is a benchmark command (docs/reliability.md)."""

import asyncio

import pytest

from service.clients.local import running_server
from service.clients.soak import run_soak
from service.settings import Settings

KEY = "soak-key"
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def server(trained):
    settings = Settings(
        model_dir=trained.run_dir, api_key=KEY, session_ttl_s=2.0, max_body_bytes=MAX_BODY,
        batch_sizes=(1, 4), max_batch=4, sample_counts=(),
    )  # fmt: skip
    with running_server(settings) as (url, _):
        yield url


@pytest.mark.slow
def test_a_short_soak_sees_no_error_no_5xx_and_leaks_no_session(server):
    report = asyncio.run(
        run_soak(server, 5.0, KEY, good=3, bad=2, abandon=2, settle_s=20, max_body=MAX_BODY)
    )
    assert report["failures"] == []
    assert report["requests"] > 0 and report["bad_inputs"] > 0 and report["retries"] > 0
    assert report["sessions_abandoned"] > 0
    assert report["good_errors"] == 0 and report["responses_5xx"] == 0
    assert report["retries_answered_differently"] == 0
    assert report["sessions_changed_by_bad_input"] == 0
    assert report["sessions_leaked"] == 0
    assert set(report["bad_input_statuses"]) <= {"400", "409", "413", "422"}
