"""`drive` runs a real PointMaze episode through the service with the bundled model."""

import pytest

from service.clients.client import Client
from service.clients.drive import drive_episode
from service.clients.local import running_server
from service.settings import Settings


@pytest.mark.slow
def test_drive_reaches_an_easy_goal_with_the_bundled_model():
    settings = Settings(batch_sizes=(1,), max_batch=1, sample_counts=(32,))
    options = {"reset_cell": [1, 1], "goal_cell": [1, 2]}  # the next cell along the corridor
    with running_server(settings) as (url, _), Client(url) as client:
        result = drive_episode(
            client, "pointmaze-umaze", seed=0, reset_options=options,
            planner={"planner": "random_shooting"}, max_steps=150,
        )  # fmt: skip
    assert result.success and result.steps < 150 and result.episode_return == 1.0
    assert len(result.latency_ms) == result.steps
