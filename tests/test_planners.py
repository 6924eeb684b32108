"""The diffusion sampler, the four planners, online adaptation and task inference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training.checkpoint import restore_bundle
from training.diffusion import cosine_schedule, ddim_sample, v_loss
from training.models.mdn_rnn import initial_state
from training.models.successor import PsiNoiseModel, cumulants, random_fourier_projection
from training.models.value import least_squares_weights
from training.planners import (
    PLANNERS,
    Knobs,
    PlanShape,
    adapt_delta,
    compile_decide,
    plan,
    zeros_like_psi,
)
from training.tasks import TaskError, task_weights


def test_ddim_sampler_reproduces_a_conditional_2d_distribution():
    """Condition 0: one Gaussian at (2, -1); condition 1: two modes at (+-2, 0)."""
    net = PsiNoiseModel(psi_dim=2, hidden=64, depth=2)
    schedule = cosine_schedule(100)
    v_fn = lambda p, x, t, c: net.apply({"params": p}, x, t, c)  # noqa: E731

    def draw(key, n):
        k_c, k_mode, k_x = jax.random.split(key, 3)
        c = jax.random.bernoulli(k_c, 0.5, (n,))
        sign = jnp.where(jax.random.bernoulli(k_mode, 0.5, (n,)), 1.0, -1.0)
        centre = jnp.where(c[:, None], jnp.stack([2 * sign, 0 * sign], -1), jnp.array([2.0, -1]))
        x = centre + 0.3 * jax.random.normal(k_x, (n, 2))
        return x, jax.nn.one_hot(c.astype(jnp.int32), 2)

    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.ones(1), jnp.zeros((1, 2)))
    params = params["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
        k_data, k_loss = jax.random.split(key)
        x, c = draw(k_data, 256)
        loss, grads = jax.value_and_grad(lambda p: v_loss(v_fn, p, schedule, x, c, k_loss))(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(1500):
        params, opt_state, _ = step(params, opt_state, jax.random.key(i + 1))

    n = 2000
    noise = jax.random.normal(jax.random.key(99), (n, 2))
    single = ddim_sample(v_fn, params, schedule, jnp.tile(jnp.array([1.0, 0]), (n, 1)), noise, 20)
    np.testing.assert_allclose(np.mean(single, 0), [2.0, -1.0], atol=0.1)
    np.testing.assert_allclose(np.std(single, 0), [0.3, 0.3], atol=0.1)
    modes = ddim_sample(v_fn, params, schedule, jnp.tile(jnp.array([0.0, 1]), (n, 1)), noise, 20)
    right = np.asarray(modes[:, 0] > 0)
    assert 0.4 < right.mean() < 0.6  # both modes, in equal measure
    np.testing.assert_allclose(np.mean(modes[right], 0), [2.0, 0.0], atol=0.15)
    np.testing.assert_allclose(np.mean(modes[~right], 0), [-2.0, 0.0], atol=0.15)
    assert 0.15 < float(np.std(modes[right][:, 1])) < 0.45


def test_cumulants_have_the_bias_feature_and_a_fixed_projection():
    proj = random_fourier_projection(jax.random.key(0), 2, 16, 0.5)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    phi = cumulants(proj, x)
    assert phi.shape == (5, 17) and np.all(np.asarray(phi[:, -1]) == 1.0)
    # sqrt(2/D) cos(.) features: the kernel approximation phi(x).phi(x) ~ 1 + 1
    np.testing.assert_allclose(np.sum(np.asarray(phi) ** 2, -1), 2.0, atol=0.6)
    again = random_fourier_projection(jax.random.key(0), 2, 16, 0.5)
    np.testing.assert_array_equal(np.asarray(cumulants(again, x)), np.asarray(phi))


@pytest.fixture(scope="module")
def bundle(trained):
    return restore_bundle(trained.run_dir)


def goal_weights(bundle, goal=(1.0, 1.0)):
    return jnp.asarray(task_weights(bundle.model, bundle.params, {"kind": "goal", "goal": goal}))


def planning_state(bundle, seed=0):
    model = bundle.model
    return jax.random.normal(jax.random.key(seed), (model.state_dim,))


def test_online_adaptation_objective_increases_over_its_steps(bundle):
    model, params = bundle.model, bundle.params
    shape = PlanShape("online_adaptation", 4, 8, 8, 16)
    knobs = Knobs(jnp.float32(1e-3), jnp.float32(1.0), jnp.float32(0.0))
    delta, trace, kept, kl, before, after = adapt_delta(
        model, shape, params, planning_state(bundle), goal_weights(bundle),
        jax.random.key(1), knobs, zeros_like_psi(params),
    )  # fmt: skip
    trace = np.asarray(trace)
    assert trace.shape == (9,)
    assert trace[-1] > trace[0]
    assert np.sum(np.diff(trace) > 0) >= 6  # rises on most steps
    assert int(kept) == 8  # the last iterate is the best one
    assert float(after) > float(before) and float(kl) > 0.0
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(delta)) > 0.0


def test_large_kl_coefficient_keeps_delta_near_zero_and_plans_like_random_shooting(bundle):
    model, params = bundle.model, bundle.params
    state, weights, key = planning_state(bundle, 3), goal_weights(bundle), jax.random.key(5)

    def adapted(kl_coef):
        knobs = Knobs(jnp.float32(1e-3), jnp.float32(kl_coef), jnp.float32(0.0))
        shape = PlanShape("online_adaptation", 4, 8, 10, 8)
        return plan(model, shape, params, state, weights, key, knobs)

    def largest(delta):
        return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(delta))

    free, held = adapted(0.0), adapted(1e6)
    assert largest(free.delta) > 1e-3
    assert largest(held.delta) == 0.0 and int(held.kept_step) == 0
    assert np.all(np.asarray(held.objective[1:]) < float(held.objective[0]))
    shooting = plan(
        model, PlanShape("random_shooting", 4, 8, 10, 8), params, state, weights, key,
        Knobs(jnp.float32(1e-3), jnp.float32(1e6), jnp.float32(0.0)),
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(held.action), np.asarray(shooting.action), rtol=1e-6)
    assert float(held.value) == pytest.approx(float(shooting.value), rel=1e-6)


@pytest.mark.parametrize("planner", PLANNERS)
def test_every_planner_acts_inside_the_action_space(bundle, planner):
    model, params = bundle.model, bundle.params
    config = bundle.config.planning.model_copy(update={"planner": planner, "guidance_scale": 50.0})
    decide = compile_decide(model, PlanShape.of(config))
    low, high = np.array(model.spaces.action_low), np.array(model.spaces.action_high)
    huge = goal_weights(bundle) * 1e4
    for seed in range(4):
        obs = jax.random.normal(jax.random.key(seed), (4,)) * 3.0
        lstm = tuple(jax.random.normal(jax.random.key(seed + 10), (2, model.mdn.hidden)))
        delta = zeros_like_psi(params) if planner == "online_adaptation" else None
        for weights in (goal_weights(bundle), huge):
            out = decide(params, lstm, obs, weights, jax.random.key(seed), Knobs.of(config), delta)
            action = np.asarray(out.plan.action)
            assert action.shape == (2,) and np.all(np.isfinite(action))
            assert np.all(action >= low) and np.all(action <= high)
            assert out.lstm[1].shape == (model.mdn.hidden,)


@pytest.mark.parametrize("planner", PLANNERS)
def test_batched_decisions_equal_one_by_one_decisions(bundle, planner):
    model, params = bundle.model, bundle.params
    config = bundle.config.planning.model_copy(update={"planner": planner})
    shape, knobs = PlanShape.of(config), Knobs.of(config)
    n = 3
    obs = jax.random.normal(jax.random.key(0), (n, 4))
    lstm = tuple(0.1 * jax.random.normal(jax.random.key(1), (2, n, model.mdn.hidden)))
    weights = jnp.stack([goal_weights(bundle, g) for g in [(1, 1), (-1, 1), (0, -1)]])
    keys = jax.random.split(jax.random.key(2), n)
    delta = None
    if planner == "online_adaptation":
        delta = jax.tree.map(lambda x: jnp.stack([x] * n), zeros_like_psi(params))
    # Each session brings its own knobs: the second one a different KL coefficient.
    knob_rows = [knobs, knobs._replace(kl_coef=jnp.float32(3.0)), knobs]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *knob_rows)
    batched = compile_decide(model, shape, batched=True)(
        params, lstm, obs, weights, keys, stacked, delta
    )
    single = compile_decide(model, shape)
    for i in range(n):
        item = jax.tree.map(lambda x, i=i: x[i], delta) if delta is not None else None
        lstm_i = (lstm[0][i], lstm[1][i])
        one = single(params, lstm_i, obs[i], weights[i], keys[i], knob_rows[i], item)
        np.testing.assert_allclose(batched.plan.action[i], one.plan.action, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched.plan.value[i], one.plan.value, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(batched.lstm[1][i], one.lstm[1], rtol=1e-4, atol=1e-5)


def test_least_squares_recovers_linear_reward_weights(bundle):
    model, params = bundle.model, bundle.params
    rng = np.random.default_rng(0)
    obs = rng.uniform(-2, 2, (400, 4)).astype(np.float32)
    phi = np.asarray(model.phi(params, jnp.asarray(obs), model.encode(params, jnp.asarray(obs))))
    true_w = rng.normal(size=model.psi_dim).astype(np.float32)
    task = {
        "kind": "reward_samples",
        "observations": obs.tolist(),
        "rewards": (phi @ true_w).tolist(),
    }
    fitted = task_weights(model, params, task)
    np.testing.assert_allclose(fitted, true_w, atol=0.05)
    w = least_squares_weights(jnp.asarray(phi), jnp.asarray(phi @ true_w))
    np.testing.assert_allclose(np.asarray(w), fitted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"kind": "reward_weights", "weights": [1.0, 2.0]}, "length 16"),
        ({"kind": "goal", "goal": [1.0]}, "goal must be length 2"),
        ({"kind": "goal", "goal": [1.0, float("nan")]}, "finite"),
        ({"kind": "goal", "goal": "north"}, "list of numbers"),
        ({"kind": "reward_samples", "observations": [[0, 0, 0, 0]], "rewards": [1]}, "at least"),
        ({"kind": "reward_samples", "observations": [[0, 0]] * 3, "rewards": [1] * 3}, "shape"),
        ({"kind": "telepathy"}, "unknown task kind"),
    ],
)
def test_bad_tasks_are_refused_clearly(bundle, task, message):
    with pytest.raises(TaskError, match=message):
        task_weights(bundle.model, bundle.params, task)


def test_controller_planner_is_the_controller(bundle):
    model, params = bundle.model, bundle.params
    state = planning_state(bundle)
    out = plan(model, PlanShape("controller", 4, 8, 5, 8), params, state, goal_weights(bundle),
               jax.random.key(0), Knobs.of(bundle.config.planning))  # fmt: skip
    z, h = state[: model.latent_dim], state[model.latent_dim :]
    mean, _ = model.controller.apply({"params": params["controller"]}, z, h)
    np.testing.assert_allclose(np.asarray(out.action), np.clip(np.asarray(mean), -1, 1))
    assert initial_state((), 4)[0].shape == (4,)
