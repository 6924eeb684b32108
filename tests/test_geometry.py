"""The learned geometry (geometry.space: steps): a map of the whole observation in which
distance counts the data's steps, where goals, cumulants and the subgoal graph measure."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from tests.conftest import TINY
from training.analysis.ogbench_suite import (
    DataSubgoals,
    Start,
    dataset_episodes,
    reset_episode,
    run_lockstep,
    suite_env,
)
from training.config import parse_config
from training.data.datasets import dataset_info, open_dataset
from training.data.observation_map import ObservationMap
from training.data.ogbench_recipe import collect_ogbench_dataset
from training.errors import UsageError
from training.learning.checkpoint import restore_bundle
from training.learning.loop import train
from training.models.geometry import step_losses
from training.planning.subgoals import STEPS_LENGTHS, build_data_graph, data_aim, data_route
from training.planning.tasks import TaskError, task_weights

STEPS = {
    **TINY,
    "geometry": {"space": "steps", "dim": 4, "hidden": 32, "depth": 2},
    "successor": {k: v for k, v in TINY["successor"].items() if k != "feature_dims"},
    "value": {"hidden": 32, "goal_weights": "least_squares", "goal_sigma": 3.0},
    "train": {**TINY["train"], "geometry_steps": 400},
}


def test_over_estimated_steps_cost_more_than_under_estimated_ones():
    gaps, valid, far = np.array([4.0]), np.array([1.0]), np.array([100.0])
    over, hinge = step_losses(np.array([6.0]), gaps, valid, far, 8, 0.2)
    under, _ = step_losses(np.array([2.0]), gaps, valid, far, 8, 0.2)
    assert over == pytest.approx(4 * under)  # (1 - 0.2) against 0.2
    assert hinge == 0.0  # far beyond the window: nothing pushes
    _, close = step_losses(gaps, gaps, valid, np.array([2.0]), 8, 0.2)
    assert close == pytest.approx(0.75**2)


def test_a_learned_geometry_replaces_the_goal_dimensions():
    with pytest.raises(UsageError, match="go together"):
        parse_config({**STEPS, "train": TINY["train"]})
    with pytest.raises(UsageError, match="leave value.goal_dims"):
        parse_config({**STEPS, "value": {"goal_dims": [0, 1]}})


@pytest.fixture(scope="module")
def bundle(umaze_data, tmp_path_factory):
    run = train(parse_config(STEPS), umaze_data, tmp_path_factory.mktemp("steps") / "run",
                progress=False)  # fmt: skip
    return restore_bundle(run.run_dir)


def test_the_map_counts_the_data_s_steps(bundle, umaze_data):
    model, params = bundle.model, bundle.params
    episode = dataset_episodes(bundle)[0]
    points = np.asarray(model.steps_point(params, episode))
    first = np.arange(0, len(episode) - 8)
    gaps = np.random.default_rng(0).integers(1, 8, len(first))
    distances = np.linalg.norm(points[first] - points[first + gaps], axis=1)
    assert spearmanr(distances, gaps).statistic > 0.5
    assert bundle.metadata["summary"]["geometry"]["steps_error"] < 3.0


def test_goals_are_whole_observations_and_the_graph_counts_in_steps(bundle):
    model, params = bundle.model, bundle.params
    observation = np.asarray(params["normaliser"]["mean"])
    assert task_weights(model, params, {"kind": "goal", "goal": observation.tolist()}).shape == (
        model.psi_dim,
    )
    with pytest.raises(TaskError, match="length 4"):
        task_weights(model, params, {"kind": "goal", "goal": [0.0, 0.0]})

    episodes = dataset_episodes(bundle)
    graph = build_data_graph(model, params, episodes, n_nodes=12, max_edge_steps=10)
    assert (graph.radius, graph.near) == STEPS_LENGTHS
    assert graph.positions.shape == (12, 4) and graph.trajectory.shape[1] == 4
    subgoals = DataSubgoals(graph, lookahead=5.0, reach=6.0)
    goal = episodes[0][-1]
    subgoals.start(bundle, [goal])
    route = data_route(graph, np.asarray(model.goal_point(params, goal)))
    here = np.asarray(model.state_point(params, episodes[0][0]))
    aim = data_aim(graph, route, here, 5.0, 6.0)
    assert aim is None or np.linalg.norm(aim - here) <= 6.0 + 1e-4
    weights = subgoals.aims(params, episodes[0][:1], None, None, 0)
    assert len(weights) == 1 and (weights[0] is None or weights[0].shape == (model.psi_dim,))


@pytest.mark.slow
def test_the_learned_geometry_sees_through_a_random_linear_map(tmp_path):
    """The invariance test, small: one tiny dataset as it is and through a random linear
    map (rotated, ×10, six noise dimensions), one config: the two step maps measure the
    same distances between the same states, and the suite's environment sees through the
    map. The full-size test trains and evaluates on OGBench's whole dataset (docs)."""
    plain, mapped = (
        collect_ogbench_dataset(
            "pointmaze-medium-stitch-v0",
            tmp_path / name,
            seed=2,
            episodes=2,
            progress=False,
            map_seed=seed,
        )  # fmt: skip
        for name, seed in (("plain", None), ("mapped", 7))
    )
    recorded = dataset_info(open_dataset(mapped))["observation_map"]
    assert (recorded["dim"], recorded["noise_dims"], recorded["scale"]) == (2, 6, 10.0)
    maze = {**STEPS, "env": "pointmaze-medium-v0",
            "train": {**STEPS["train"], "geometry_steps": 1000}}  # fmt: skip
    bundles = [restore_bundle(train(parse_config(maze), data, tmp_path / f"run{i}",
                                    progress=False).run_dir)  # fmt: skip
               for i, data in enumerate((plain, mapped))]  # fmt: skip
    assert bundles[1].model.spaces.obs_shape == (8,)
    observations = [np.concatenate(dataset_episodes(b)) for b in bundles]
    np.testing.assert_allclose(observations[1][:, :2] / 10, observations[0] @ ObservationMap(
        **recorded).matrix[:2].T / 10, atol=1e-3)  # fmt: skip
    # Random pairs of the data's states: each map's distances follow the positions', through
    # the rotation, the scale and the noise, and the two maps agree.
    pairs = np.random.default_rng(1).integers(0, len(observations[0]), (3000, 2))
    positions = observations[0]
    apart = np.linalg.norm(positions[pairs[:, 0]] - positions[pairs[:, 1]], axis=1)
    counts = []
    for bundle, obs in zip(bundles, observations, strict=True):
        points = np.asarray(bundle.model.steps_point(bundle.params, obs))
        counts.append(np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1))
    assert spearmanr(counts[0], apart).statistic > 0.8  # 0.98 when written
    assert spearmanr(counts[1], apart).statistic > 0.6  # 0.74
    assert spearmanr(counts[0], counts[1]).statistic > 0.6  # 0.79
    start = Start(1, {"task_id": 1}, seed=0)
    (episode,) = run_lockstep(bundles[1], bundles[1].config.planning, [start], max_steps=3)
    assert episode.steps == 3 and np.isfinite(episode.final_distance)
    obs, info = reset_episode(suite_env(bundles[1]), start)
    assert obs.shape == (8,) and np.asarray(info["goal"]).shape == (8,)
