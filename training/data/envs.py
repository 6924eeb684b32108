"""Environments, each exactly as its datasets store it, and their behaviour policies: the
packaged ones by name (ENVIRONMENTS), and any registered gymnasium id (OGBench's mazes
among them) as a vector environment."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import farama_notifications
import gymnasium as gym
import numpy as np
from PIL import Image

from training.errors import UsageError

# gymnasium_robotics prints a notice about its Adroit environments on import; worldplan
# uses none of them, so drop the notice before importing it.
farama_notifications.notifications.pop("gymnasium_robotics", None)
import gymnasium_robotics  # noqa: E402
import ogbench  # noqa: E402, F401  (registers OGBench's environments with gymnasium)

gym.register_envs(gymnasium_robotics)

Cell = tuple[int, int]
FRAME_SIZE = 64


@dataclass(frozen=True)
class EnvSpec:
    name: str
    gym_id: str
    kind: str  # "vector" or "pixels"
    obs_key: str | None  # key of the observation array inside dict observations
    default_episode_steps: int


ENVIRONMENTS: dict[str, EnvSpec] = {
    spec.name: spec
    for spec in (
        EnvSpec("pointmaze-umaze", "PointMaze_UMaze-v3", "vector", "observation", 300),
        EnvSpec("pointmaze-medium", "PointMaze_Medium-v3", "vector", "observation", 600),
        EnvSpec("pendulum", "Pendulum-v1", "vector", None, 200),
        EnvSpec("carracing", "CarRacing-v3", "pixels", None, 1000),
    )
}


GENERIC_EPISODE_STEPS = 1000  # for a registered id that sets no episode limit


def get_env_spec(name: str) -> EnvSpec:
    """A packaged environment, or a registered gymnasium id as a vector environment whose
    observations are the environment's own."""
    if name in ENVIRONMENTS:
        return ENVIRONMENTS[name]
    try:
        registered = gym.spec(name)
    except gym.error.Error:
        known = ", ".join(sorted(ENVIRONMENTS))
        raise UsageError(
            f"unknown environment {name!r}: not a registered gymnasium id; known "
            f"environments: {known}"
        ) from None
    steps = registered.max_episode_steps or GENERIC_EPISODE_STEPS
    return EnvSpec(name, name, "vector", None, steps)


def gym_id_of(name: str) -> str:
    """The gymnasium id of an environment name (a packaged name, or an id already)."""
    return ENVIRONMENTS[name].gym_id if name in ENVIRONMENTS else name


def packaged_name(gym_id: str) -> str | None:
    """The packaged vector environment of a gymnasium id (pixel environments are stored
    resized, so a bare id match proves little), or None."""
    for spec in ENVIRONMENTS.values():
        if spec.kind == "vector" and spec.gym_id == gym_id:
            return spec.name
    return None


def select_observation(obs: Any, obs_key: str | None) -> Any:
    """The array part of an observation: obs[obs_key] for dict observations, else obs."""
    return obs if obs_key is None else obs[obs_key]


def is_goal_maze(name: str) -> bool:
    """A packaged PointMaze: its observations carry the goal, its reset takes cells, and it
    can end when the goal is reached (`continuing_task=False`)."""
    return name in ENVIRONMENTS and ENVIRONMENTS[name].gym_id.startswith("PointMaze_")


def observation_key(name: str, space: gym.Space) -> str | None:
    """The key of the observation array in the environment's observations, as datasets
    load them: the packaged environment's key, else "observation" in a dict space."""
    key = get_env_spec(name).obs_key
    if key is None and isinstance(space, gym.spaces.Dict) and "observation" in space.spaces:
        return "observation"
    return key


def check_observation_shape(env: gym.Env, name: str, expected: Sequence[int]) -> str | None:
    """Refuses an environment whose observations are not the shape a model was trained on,
    before its first step; returns the key of the observation array (None: the whole)."""
    key = observation_key(name, env.observation_space)
    space = env.observation_space if key is None else env.observation_space[key]
    shape = None if space.shape is None else tuple(space.shape)
    if shape != tuple(expected):
        seen = "no single array" if shape is None else f"shape {list(shape)}"
        gym_id = gym_id_of(name)
        named = repr(name) if gym_id == name else f"{name!r} ({gym_id})"
        raise UsageError(
            f"environment {named} observes {seen}, but the model was trained on observations "
            f"of shape {list(expected)}: run the environment the model was trained in"
        )
    return key


def reported_success(info: dict) -> bool | None:
    """The success an environment reports in a step's info (`success` or `is_success`),
    or None when it reports none."""
    for key in ("success", "is_success"):
        if key in info:
            return bool(np.any(info[key]))
    return None


class ResizeFrames(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Downsamples RGB frames to size x size uint8 with area averaging.

    Recording the constructor args puts the wrapper into the env spec, so a dataset's
    recovered environment produces the same frames the dataset holds.
    """

    def __init__(self, env: gym.Env, size: int = FRAME_SIZE):
        gym.utils.RecordConstructorArgs.__init__(self, size=size)
        gym.ObservationWrapper.__init__(self, env)
        self.size = size
        channels = env.observation_space.shape[-1]
        self.observation_space = gym.spaces.Box(0, 255, (size, size, channels), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return resize_frame(observation, self.size)


def resize_frame(frame: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def make_env(name: str, max_episode_steps: int | None = None, **kwargs: Any) -> gym.Env:
    """The environment as datasets store it (CarRacing frames at 64x64x3 uint8)."""
    spec = get_env_spec(name)
    steps = max_episode_steps or spec.default_episode_steps
    env = gym.make(spec.gym_id, max_episode_steps=steps, **kwargs)
    if spec.kind == "pixels":
        env = ResizeFrames(env, FRAME_SIZE)
    return env


@dataclass(frozen=True)
class Shift:
    """A robot whose drive differs from the data's: each action is rotated in its first two
    dimensions (the plane), scaled, offset, and run `delay` steps late."""

    rotate_deg: float = 0.0
    gain: float = 1.0
    bias: tuple[float, ...] = ()
    delay: int = 0

    KEYS = ("rotate", "gain", "bias", "delay")

    @classmethod
    def parse(cls, items: Sequence[str]) -> Shift:
        """`--shift rotate=90 --shift gain=0.4 --shift bias=0.3,0.0 --shift delay=1`."""
        fields: dict[str, Any] = {}
        for item in items:
            key, _, value = item.partition("=")
            if key not in cls.KEYS:
                raise UsageError(f"--shift {item!r}: the keys are {', '.join(cls.KEYS)}")
            try:
                numbers = [float(v) for v in value.split(",")]
            except ValueError:
                raise UsageError(f"--shift {item!r}: {key} takes numbers") from None
            if key == "bias":
                fields["bias"] = tuple(numbers)
            elif len(numbers) != 1:
                raise UsageError(f"--shift {item!r}: {key} takes one number")
            elif key == "delay":
                if not numbers[0].is_integer() or numbers[0] < 0:
                    raise UsageError(f"--shift {item!r}: a delay is a whole number of steps")
                fields["delay"] = int(numbers[0])
            else:
                fields["rotate_deg" if key == "rotate" else "gain"] = numbers[0]
        return cls(**fields)

    def __bool__(self) -> bool:
        return self != Shift()

    def transform(self, action: np.ndarray) -> np.ndarray:
        """The action the robot runs for `action` (before the delay)."""
        out = np.asarray(action, np.float64) * self.gain
        if self.rotate_deg:
            angle = np.deg2rad(self.rotate_deg)
            c, s = np.cos(angle), np.sin(angle)
            out[:2] = [c * out[0] - s * out[1], s * out[0] + c * out[1]]
        if self.bias:
            if len(self.bias) != len(out):
                raise UsageError(f"--shift bias has {len(self.bias)} numbers, actions {len(out)}")
            out = out + np.asarray(self.bias)
        return out


NO_SHIFT = Shift()  # the drive as in the data


class ShiftedDrive(gym.Wrapper):
    """The environment behind a shifted drive: every action goes through `shift` (and its
    delay; zeros run first) and is clipped to the action space before the environment
    runs it. Nothing of it reaches the planner."""

    def __init__(self, env: gym.Env, shift: Shift):
        super().__init__(env)
        self.shift = shift
        self.pending: deque = deque()

    def reset(self, **kwargs):
        zero = np.zeros(self.action_space.shape, np.float64)
        self.pending = deque([zero] * self.shift.delay)
        return self.env.reset(**kwargs)

    def step(self, action):
        self.pending.append(self.shift.transform(action))
        run = self.pending.popleft()
        space = self.action_space
        return self.env.step(np.clip(run, space.low, space.high).astype(space.dtype))


class BehaviourPolicy(Protocol):
    def reset_options(self) -> dict | None: ...

    def reset(self, obs: Any, info: dict) -> None: ...

    def act(self, obs: Any) -> np.ndarray: ...


MAZE_ACTION_NOISE = 0.2  # standard deviation of the Gaussian added to the maze PD actions
SWING_UP_NOISE = 0.5  # standard deviation of the Gaussian added to the pendulum's swing-up
RARE_GOAL_PROB = 0.05  # how often a skewed maze's behaviour goal lies in a rare cell


def make_behaviour_policy(
    name: str,
    env: gym.Env,
    rng: np.random.Generator,
    skew: float = 0.0,
    noise: float | None = None,
    waypoint_jitter: float = 0.0,
    rare_goal_prob: float = RARE_GOAL_PROB,
    swing_up: float = 0.0,
) -> BehaviourPolicy:
    """The environment's behaviour policy; skew, waypoint_jitter and rare_goal_prob shape
    the pointmaze one (MazeWaypointPolicy), swing_up the pendulum's, noise (None: the
    policy's default) either, and each is an error elsewhere."""
    spec = get_env_spec(name)
    if not 0.0 <= swing_up <= 1.0:
        raise UsageError(f"swing_up is a fraction of the episodes, in [0, 1]: got {swing_up}")
    if swing_up and spec.name != "pendulum":
        raise UsageError(f"swing_up: only for pendulum, not {name!r}")
    if name.startswith("pointmaze"):
        maze = env.unwrapped.maze
        noise = MAZE_ACTION_NOISE if noise is None else noise
        return MazeWaypointPolicy(maze, env.action_space, rng, skew, noise=noise,
                                  waypoint_jitter=waypoint_jitter,
                                  rare_goal_prob=rare_goal_prob)  # fmt: skip
    swings = spec.name == "pendulum" and swing_up > 0
    changed = {
        "skew": skew,
        "noise": noise is not None and not swings,
        "waypoint_jitter": waypoint_jitter,
        "rare_goal_prob": rare_goal_prob != RARE_GOAL_PROB,
    }
    if any(changed.values()):
        options = ", ".join(option for option, value in changed.items() if value)
        raise UsageError(
            f"{options}: only for the pointmaze environments (noise: and pendulum's "
            f"swing-ups), not {name!r}"
        )
    if spec.name == "pendulum":
        noise = SWING_UP_NOISE if noise is None else noise
        return PendulumPolicy(env.action_space, rng, swing_up, noise)
    if spec.name == "carracing":
        return BrownianDrivingPolicy(env.action_space, rng)
    if isinstance(env.action_space, gym.spaces.Box):  # any other environment: uniform actions
        return UniformRandomPolicy(env.action_space, rng)
    raise UsageError(f"no behaviour policy for environment {name!r} (continuous actions only)")


# ----- maze geometry (pure functions over a maze map: 1 = wall, anything else free) -----


def free_cells(maze_map: Sequence[Sequence[Any]]) -> list[Cell]:
    """Free cells in row-major order."""
    return [(r, c) for r, row in enumerate(maze_map) for c, value in enumerate(row) if value != 1]


def bfs_path(maze_map: Sequence[Sequence[Any]], start: Cell, goal: Cell) -> list[Cell]:
    """Shortest 4-neighbour path of free cells from start to goal, both included."""
    start, goal = _as_cell(start), _as_cell(goal)
    free = set(free_cells(maze_map))
    for cell in (start, goal):
        if cell not in free:
            raise UsageError(f"cell {cell} is not a free cell of the maze")
    parents: dict[Cell, Cell | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            break
        r, c = cell
        for nxt in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if nxt in free and nxt not in parents:
                parents[nxt] = cell
                queue.append(nxt)
    if goal not in parents:
        raise UsageError(f"no path from {start} to {goal}")
    path = [goal]
    while (parent := parents[path[-1]]) is not None:
        path.append(parent)
    return path[::-1]


def rare_cells(maze_map: Sequence[Sequence[Any]], skew: float) -> list[Cell]:
    """The fraction `skew` of free cells farthest (in BFS steps) from the first free cell,
    farthest first, ties broken by row then column.

    The farthest cells are a far end of the maze that few shortest paths between the other
    cells cross, so keeping starts and behaviour goals off them leaves them rarely visited.
    At least one cell when skew > 0, and at least two free cells are always left over so the
    behaviour still has somewhere to go.
    """
    if not 0.0 <= skew < 1.0:
        raise UsageError(f"skew must lie in [0, 1), got {skew}")
    if skew == 0.0:
        return []
    cells = free_cells(maze_map)
    if len(cells) < 3:
        raise UsageError("the maze has too few free cells to set any aside as rare")
    count = min(max(1, int(skew * len(cells) + 0.5)), len(cells) - 2)
    distance = {cell: len(bfs_path(maze_map, cells[0], cell)) - 1 for cell in cells}
    return sorted(cells, key=lambda rc: (-distance[rc], rc))[:count]


def _as_cell(cell: Any) -> Cell:
    return int(cell[0]), int(cell[1])


# ----- behaviour policies -----


class MazeWaypointPolicy:
    """Wanders a PointMaze: BFS to a random goal cell, PD-steering through its cells.

    Episodes never start in the rare cells, and a behaviour goal lies in one only with
    probability `rare_goal_prob`: the rare part of the maze is visited, but rarely.
    Each waypoint lies `waypoint_jitter` (a fraction of a cell, uniform per axis) off its
    cell's centre, drawn afresh with each plan, so the data also covers cell edges and
    wall contact: the states a planner's own mistakes lead to.
    """

    def __init__(
        self,
        maze: Any,
        action_space: gym.spaces.Box,
        rng: np.random.Generator,
        skew: float = 0.0,
        kp: float = 10.0,
        kd: float = 1.0,
        noise: float = MAZE_ACTION_NOISE,
        waypoint_jitter: float = 0.0,
        waypoint_reach: float = 0.3,
        goal_reach: float = 0.15,
        rare_goal_prob: float = RARE_GOAL_PROB,
    ):
        self.maze = maze
        self.low, self.high = action_space.low, action_space.high
        self.rng = rng
        self.kp, self.kd, self.noise = kp, kd, noise
        scale = float(maze.maze_size_scaling)
        self.jitter = waypoint_jitter * scale
        self._offsets: dict[Cell, np.ndarray] = {}
        self.waypoint_reach, self.goal_reach = waypoint_reach * scale, goal_reach * scale
        self.rare = rare_cells(maze.maze_map, skew)
        rare = set(self.rare)
        self.candidates = [cell for cell in free_cells(maze.maze_map) if cell not in rare]
        if not 0.0 <= rare_goal_prob <= 1.0:
            raise UsageError(f"rare_goal_prob must lie in [0, 1], got {rare_goal_prob}")
        self.rare_goal_prob = rare_goal_prob
        self._pending_goal: Cell | None = None
        self._path: list[Cell] = []
        self._index = 0

    @property
    def goal(self) -> Cell | None:
        """The behaviour goal cell currently steered for."""
        return self._path[-1] if self._path else None

    def reset_options(self) -> dict:
        start = self._pick_cell(exclude=None)
        goal = self._pick_goal(exclude=start)
        self._pending_goal = goal
        return {"reset_cell": np.array(start), "goal_cell": np.array(goal)}

    def reset(self, obs: Any, info: dict) -> None:
        cell = self._cell(obs["observation"][:2])
        goal = self._pending_goal or self._pick_goal(exclude=cell)
        self._pending_goal = None
        self._plan(cell, goal)

    def act(self, obs: Any) -> np.ndarray:
        pos, vel = obs["observation"][:2], obs["observation"][2:4]
        cell = self._cell(pos)
        if not self._path or cell not in self._path[max(self._index - 1, 0) : self._index + 1]:
            # Knocked off the planned corridor (or never planned): replan from here.
            self._plan(cell, self._path[-1] if self._path else self._pick_goal(exclude=cell))
        last = len(self._path) - 1
        while self._index < last and self._dist(pos, self._path[self._index]) < self.waypoint_reach:
            self._index += 1
        if self._index == last and self._dist(pos, self._path[last]) < self.goal_reach:
            self._plan(cell, self._pick_goal(exclude=cell))
        target = self._waypoint(self._path[self._index])
        action = self.kp * (target - pos) - self.kd * vel
        action = action + self.rng.normal(0.0, self.noise, size=action.shape)
        return np.clip(action, self.low, self.high).astype(np.float32)

    def _plan(self, start: Cell, goal: Cell) -> None:
        self._path = bfs_path(self.maze.maze_map, start, goal)
        self._index = min(1, len(self._path) - 1)
        self._offsets = (
            {cell: self.rng.uniform(-self.jitter, self.jitter, size=2) for cell in self._path[1:]}
            if self.jitter
            else {}
        )

    def _pick_cell(self, exclude: Cell | None, cells: list[Cell] | None = None) -> Cell:
        cells = cells or self.candidates
        options = [cell for cell in cells if cell != exclude] or cells
        return options[int(self.rng.integers(len(options)))]

    def _pick_goal(self, exclude: Cell | None) -> Cell:
        if self.rare and self.rng.random() < self.rare_goal_prob:
            return self._pick_cell(exclude, self.rare)
        return self._pick_cell(exclude)

    def _cell(self, pos: np.ndarray) -> Cell:
        cell = _as_cell(self.maze.cell_xy_to_rowcol(np.asarray(pos)))
        if self.maze.maze_map[cell[0]][cell[1]] == 1:
            # Contact can push the centre a hair into a wall cell; use the nearest free cell.
            cell = min(
                free_cells(self.maze.maze_map),
                key=lambda rc: float(np.linalg.norm(self._centre(rc) - pos)),
            )
        return cell

    def _centre(self, cell: Cell) -> np.ndarray:
        return np.asarray(self.maze.cell_rowcol_to_xy(np.array(cell)), dtype=np.float64)

    def _waypoint(self, cell: Cell) -> np.ndarray:
        return self._centre(cell) + self._offsets.get(cell, 0.0)

    def _dist(self, pos: np.ndarray, cell: Cell) -> float:
        return float(np.linalg.norm(self._waypoint(cell) - pos))


class UniformRandomPolicy:
    def __init__(self, action_space: gym.spaces.Box, rng: np.random.Generator):
        self.low, self.high = action_space.low, action_space.high
        self.rng = rng

    def reset_options(self) -> None:
        return None

    def reset(self, obs: Any, info: dict) -> None:
        pass

    def act(self, obs: Any) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)


class PendulumPolicy:
    """Pendulum's behaviour: uniform random actions, or, in a `swing_up` fraction of the
    episodes (drawn at each reset), a swing-up with Gaussian noise on its torque.

    The swing-up pumps energy towards the upright pendulum's, E = θ'²/2 + 15 cos θ = 15
    (Pendulum-v1: θ'' = 15 sin θ + 3u, θ = 0 upright), at full torque in the direction of
    θ' while E is short of it, and holds the top with a PD law once cos θ > 0.85. Noiseless
    it returns about -137 over 20 resets, with noise 0.5 about -150.
    """

    def __init__(self, action_space: gym.spaces.Box, rng: np.random.Generator, swing_up: float,
                 noise: float = SWING_UP_NOISE):  # fmt: skip
        self.random = UniformRandomPolicy(action_space, rng)
        self.rng, self.swing_up, self.noise = rng, swing_up, noise
        self.low, self.high = action_space.low, action_space.high
        self.expert = False

    def reset_options(self) -> None:
        return None

    def reset(self, obs: Any, info: dict) -> None:
        self.expert = bool(self.rng.random() < self.swing_up)

    def act(self, obs: Any) -> np.ndarray:
        if not self.expert:
            return self.random.act(obs)
        torque = swing_up_torque(*np.asarray(obs, np.float64))
        action = torque + self.noise * self.rng.normal(size=self.low.shape)
        return np.clip(action, self.low, self.high).astype(np.float32)


def swing_up_torque(cos: float, sin: float, velocity: float) -> float:
    """Pendulum-v1's swing-up: energy pumping at full torque, a PD hold near the top."""
    if cos > 0.85:
        return float(np.clip(-(10.0 * np.arctan2(sin, cos) + 2.0 * velocity), -2.0, 2.0))
    energy = 0.5 * velocity**2 + 15.0 * cos
    return 2.0 * float(np.sign(velocity * (15.0 - energy)) or 1.0)


class BrownianDrivingPolicy:
    """CarRacing actions as a clipped random walk: [steer, gas, brake].

    Gas drifts up and brake drifts down so the car keeps moving; steering decays towards
    straight so it does not sit at full lock and spin.
    """

    def __init__(
        self,
        action_space: gym.spaces.Box,
        rng: np.random.Generator,
        step_std: float = 0.1,
        steer_decay: float = 0.9,
        gas_drift: float = 0.03,
        brake_drift: float = -0.05,
    ):
        self.low, self.high = action_space.low, action_space.high
        self.rng = rng
        self.step_std = step_std
        self.steer_decay = steer_decay
        self.drift = np.array([0.0, gas_drift, brake_drift])
        self._action = np.zeros(3)

    def reset_options(self) -> None:
        return None

    def reset(self, obs: Any, info: dict) -> None:
        self._action = np.array([0.0, 0.5, 0.0])

    def act(self, obs: Any) -> np.ndarray:
        step = self.rng.normal(0.0, self.step_std, size=3) + self.drift
        action = self._action * np.array([self.steer_decay, 1.0, 1.0]) + step
        self._action = np.clip(action, self.low, self.high)
        return self._action.astype(np.float32)
