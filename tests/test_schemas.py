"""The API contract's bodies refuse what docs/design.md §4 does not allow."""

import pytest
from pydantic import ValidationError

from service.schemas import ActRequest, AdaptRequest, CreateSession, GoalTask, RewardSamplesTask


def test_tasks_are_told_apart_by_kind():
    goal = CreateSession.model_validate({"task": {"kind": "goal", "goal": [1, 2]}})
    assert isinstance(goal.task, GoalTask) and goal.task.goal == [1.0, 2.0]
    samples = CreateSession.model_validate(
        {"task": {"kind": "reward_samples", "observations": [[0, 0]], "rewards": [1]}}
    )
    assert isinstance(samples.task, RewardSamplesTask)


@pytest.mark.parametrize(
    ("model", "body", "where"),
    [
        (CreateSession, {"task": {"kind": "wish"}}, "task"),
        (CreateSession, {"task": {"kind": "goal", "goal": [1], "radius": 2}}, "radius"),
        (CreateSession, {"planner": {"planner": "teleport"}}, "planner.planner"),
        (CreateSession, {"planner": {"kl_coef": -1}}, "planner.kl_coef"),
        (CreateSession, {"seed": -1}, "seed"),
        (ActRequest, {"session_id": "s", "observation": [0], "step": -1}, "step"),
        (ActRequest, {"observation": [0]}, "session_id"),
        (ActRequest, {"session_id": "s", "observation": [0], "colour": "red"}, "colour"),
        (AdaptRequest, {"session_id": "s", "steps": 0}, "steps"),
    ],
)
def test_bad_bodies_name_the_field(model, body, where):
    with pytest.raises(ValidationError) as err:
        model.model_validate(body)
    assert where in str(err.value)
