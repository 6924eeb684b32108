"""The subgoal search: step counts from values, the graph's shortest paths and the choice of
the next subgoal, on graphs whose answers are known."""

import numpy as np

from training.planning.subgoals import (
    POSITION_LENGTHS,
    DataGraph,
    GraphLengths,
    Route,
    SubgoalGraph,
    data_aim,
    data_graph,
    data_route,
    data_target,
    next_target,
    spread_indices,
    steps_from_values,
    steps_to_goal,
)

GAMMA = 0.99
MAZE = GraphLengths(*POSITION_LENGTHS, aim_reach=4.0)  # the point mazes' lengths, in units
INF = np.inf


def test_spread_points_cover_the_data():
    grid = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0)), -1).reshape(-1, 2)
    chosen = grid[spread_indices(grid, 16, seed=3)]
    assert len({tuple(p) for p in chosen}) == 16
    # every point of the grid lies within 5 of one of them (16 random ones leave gaps of 6-9)
    gaps = np.min(np.linalg.norm(grid[:, None] - chosen[None], axis=-1), axis=1)
    assert gaps.max() <= 5.0
    assert np.array_equal(spread_indices(grid, 16, seed=3), spread_indices(grid, 16, seed=3))


def test_steps_are_read_back_from_discounted_values():
    self_values = np.array([10.0, 10.0, 10.0, 10.0])
    values = self_values * GAMMA ** np.array([0.0, 5.0, 40.0, 5000.0])
    steps = steps_from_values(values, self_values, GAMMA)
    assert np.allclose(steps[:3], [0.0, 5.0, 40.0], atol=1e-6)
    assert steps[3] == INF  # below the floor: out of reach, not 5000 steps
    assert steps_from_values(np.array([12.0]), np.array([10.0]), GAMMA)[0] == 0.0


def chain(n: int, hop: float) -> np.ndarray:
    """Nodes 0 - 1 - ... - n-1, `hop` steps apart, both ways."""
    steps = np.full((n, n), INF)
    np.fill_diagonal(steps, 0.0)
    for i in range(n - 1):
        steps[i, i + 1] = steps[i + 1, i] = hop
    return steps


def test_shortest_paths_to_the_goal_follow_the_chain():
    steps = chain(4, 10.0)
    direct = np.array([INF, INF, INF, 3.0])  # only the last node sees the goal
    remaining, next_hop = steps_to_goal(steps, direct)
    assert np.allclose(remaining, [33.0, 23.0, 13.0, 3.0])
    assert list(next_hop) == [1, 2, 3, 4]  # 4: the goal itself
    # A shortcut is taken; a node cut off has no path.
    steps[0, 3] = 12.0
    steps[2, :] = steps[:, 2] = INF
    steps[2, 2] = 0.0
    remaining, next_hop = steps_to_goal(steps, direct)
    assert np.allclose(remaining[[0, 1, 3]], [15.0, 25.0, 3.0]) and remaining[2] == INF
    assert (next_hop[0], next_hop[2]) == (3, -1)


def test_the_next_subgoal_is_the_first_node_not_yet_reached():
    n, hop = 5, 20.0
    self_values = np.full(n, 10.0)
    graph = SubgoalGraph(
        observations=np.zeros((n, 2)),
        weights=np.zeros((n, 3)),
        self_values=self_values,
        steps=chain(n, hop),
        gamma=GAMMA,
        max_edge_steps=30.0,
    )
    remaining, next_hop = steps_to_goal(graph.steps, np.array([INF, INF, INF, INF, 5.0]))
    route = Route(np.zeros(3), 10.0, remaining, next_hop)
    far_goal = 10.0 * GAMMA**200

    def from_steps(node_steps):
        return next_target(graph, route, self_values * GAMMA ** np.asarray(node_steps), far_goal)

    # On node 0 (reached), aiming at node 1, 20 steps on.
    assert from_steps([0.0, 20.0, 40.0, 60.0, 80.0]) == 1
    # Halfway between 1 and 2: node 1 is behind, node 2 is 10 steps on, 3 out of reach.
    assert from_steps([30.0, 10.0, 10.0, 35.0, 55.0]) == 2
    # Nodes within reach are weighed with what remains from them: 3 beats 2.
    assert from_steps([50.0, 30.0, 12.0, 25.0, 45.0]) == 3
    # The goal itself within an edge's reach: aim at it.
    assert next_target(graph, route, self_values * GAMMA**100, 10.0 * GAMMA**10) is None


def u_turn(speed: float = 0.5, width: float = 4.0) -> np.ndarray:
    """A trajectory up the left arm of a U (x = 0), across the top (y = 10) and down the
    right arm (x = width): a wall stands between the arms, which the data never crosses."""

    def leg(a, b):
        n = int(round(np.linalg.norm(np.subtract(b, a)) / speed))
        return np.linspace(a, b, n, endpoint=False)

    return np.concatenate([leg((0, 0), (0, 10)), leg((0, 10), (width, 10)),
                           leg((width, 10), (width, 0))])  # fmt: skip


def u_graph(max_edge_steps: int = 40) -> DataGraph:
    path = u_turn()
    trajectory = np.concatenate([path, path[::-1]])  # there and back: two episodes
    episode = np.repeat([0, 1], len(path))
    nodes = np.array([0, 10, 20, 28, 38, 47])  # (0,0) (0,5) (0,10) (4,10) (4,5) (4,0.5)
    return data_graph(trajectory, episode, nodes, trajectory[nodes], np.zeros((6, 3)),
                      lengths=MAZE, max_edge_steps=max_edge_steps)  # fmt: skip


def test_data_edges_are_the_steps_the_data_took_never_through_the_wall():
    graph = u_graph()
    assert graph.positions[0].tolist() == [0.0, 0.0] and graph.positions[5].tolist() == [4.0, 0.5]
    assert graph.steps[0, 1] == 10 and graph.steps[1, 0] == 10  # both ways: two episodes
    assert graph.steps[2, 3] == 8  # across the top, 4 units at 0.5 a step
    assert graph.steps[0, 4] == 38
    # The two bottoms are 4.03 units apart through the wall and 47 steps apart by the data:
    # no edge within 40 steps, and 47 when edges may be that long.
    assert graph.steps[0, 5] == INF and graph.steps[5, 0] == INF
    assert u_graph(max_edge_steps=50).steps[0, 5] == 47


def test_the_data_route_goes_round_the_wall_and_aims_ahead_along_it():
    graph = u_graph(max_edge_steps=12)
    goal = np.array([4.0, 0.5])  # the right arm's bottom, the data passes it
    route = data_route(graph, goal)
    # The goal joins where the data passed within a unit of it: node 4 reaches it in 7.
    assert np.allclose(route.remaining, [45, 35, 25, 17, 7, 0], atol=1e-5)
    assert list(route.next_hop[:4]) == [1, 2, 3, 4] and route.next_hop[4] in (5, 6)  # 6: goal
    # Just below the left bottom, the goal 4 units away through the wall is not aimed at:
    # the farthest node at most 15 steps along the path is.
    start = np.array([0.1, -0.8])
    assert data_target(graph, route, start, lookahead=15.0) == 1
    assert data_target(graph, route, start, lookahead=25.0) == 2
    # The first node on is aimed at even when it lies beyond the lookahead.
    assert data_target(graph, route, start, lookahead=5.0) == 1
    # Where the data went on to the goal within the lookahead, the goal itself.
    assert data_target(graph, route, np.array([4.0, 5.2]), 15.0) is None
    # A goal the data never came within a unit of (inside the wall) joins where it came
    # closest: the middle of both arms, 2 units away, where nodes 1 and 4 lie.
    route = data_route(graph, np.array([2.0, 5.0]))
    assert route.remaining[1] == route.remaining[4] <= 1.0
    assert route.at_goal.sum() > 0 and np.isfinite(route.remaining).all()
    # A graph whose edges reach no node of the goal's: the goal itself, and hope.
    route = data_route(u_graph(max_edge_steps=1), np.array([2.0, 5.0]))
    assert data_target(u_graph(max_edge_steps=1), route, start, 15.0) is None


def test_an_aim_beyond_reach_is_brought_near_along_the_datas_own_way_to_it():
    graph = u_graph(max_edge_steps=12)
    goal = np.array([4.0, 0.5])
    route = data_route(graph, goal)
    start = np.array([0.1, -0.8])
    assert data_target(graph, route, start, lookahead=25.0) == 2  # (0, 10), 10.8 units away
    aim = data_aim(graph, route, start, lookahead=25.0, reach=4.0)
    # Up the left arm, the data's way to (0, 10): its last point within 4 units.
    assert aim.tolist() == [0.0, 3.0]
    # A node within reach is aimed at itself; near the goal along the data, the goal (None).
    assert data_aim(graph, route, start, 25.0, reach=12.0).tolist() == [0.0, 10.0]
    assert data_aim(graph, route, np.array([4.0, 5.2]), 15.0, reach=1.0) is None
    # Round the corner from the top: down the right arm, as the data went, to its last
    # point within 4 units.
    aim = data_aim(graph, route, np.array([2.0, 10.0]), lookahead=15.0, reach=4.0)
    assert aim.tolist() == [4.0, 7.0]


def test_the_node_a_decision_starts_from_is_one_the_data_joins_to_here_not_one_across_the_wall():
    # A narrow U, its arms 1.5 apart: nodes (0, 0), (0, 5), (0, 10), (1.5, 10), (1.5, 5),
    # (1.5, 0.5); the goal is the last.
    path = u_turn(width=1.5)
    trajectory = np.concatenate([path, path[::-1]])
    episode = np.repeat([0, 1], len(path))
    nodes = np.array([0, 10, 20, 23, 33, 42])
    graph = data_graph(trajectory, episode, nodes, trajectory[nodes], np.zeros((6, 3)),
                       lengths=MAZE, max_edge_steps=12)  # fmt: skip
    route = data_route(graph, trajectory[42])
    # At (0.1, 2.4) the nearest node is the goal's, through the wall; the data joins (0, 0)
    # and (0, 5) to here within 6 steps, so the path starts at (0, 0), up the left arm.
    # (0, 5), that near, counts as reached: the aim is (0, 10), 20 steps on.
    here = np.array([0.1, 2.4])
    assert np.argmin(np.linalg.norm(graph.positions - here, axis=1)) == 5
    assert data_target(graph, route, here, lookahead=15.0) == 2
