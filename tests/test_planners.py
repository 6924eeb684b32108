"""The diffusion sampler, the five planners, online adaptation and task inference."""

from dataclasses import replace
from typing import get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training.config import PlanningConfig
from training.learning.checkpoint import restore_bundle
from training.models.diffusion import cosine_schedule, ddim_sample, sample_with_path_kl, v_loss
from training.models.mdn_rnn import MDNRNN, initial_state
from training.models.successor import PsiNoiseModel, cumulants, random_fourier_projection
from training.models.value import least_squares_weights
from training.planning.planners import (
    PLANNER_FNS,
    PLANNERS,
    TERMINAL_SAMPLES,
    Knobs,
    PlanShape,
    adapt,
    choice_scores,
    compile_decide,
    heaviest,
    log_density,
    most_likely_latent,
    plan,
    tilt_weights,
    value_fn,
    with_delta,
    zero_delta,
)
from training.planning.tasks import TaskError, task_weights


def test_the_registry_has_a_function_for_every_name_the_config_takes():
    assert tuple(PLANNER_FNS) == PLANNERS
    assert get_args(PlanningConfig.model_fields["planner"].annotation) == PLANNERS


@pytest.mark.slow
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


def carry_and_latent(bundle, seed=0):
    """M's LSTM carry (c, h) and V's latent z whose planning state is planning_state's."""
    z, h = jnp.split(planning_state(bundle, seed), [bundle.model.latent_dim])
    return (jnp.zeros_like(h), h), z


def knobs(lr=1e-3, kl_coef=1.0, steps=8):
    return Knobs(jnp.float32(lr), jnp.float32(kl_coef), jnp.float32(0.0), jnp.float32(steps))


ORIGINAL_RULE = {"adaptation": "gradient", "kl_estimator": "proxy", "adapt_params": "all",
             "support_guard": False}  # fmt: skip


@pytest.mark.parametrize(
    "rule",
    [ORIGINAL_RULE, {**ORIGINAL_RULE, "kl_estimator": "path", "adapt_params": "film"},
     {"adaptation": "reweighted", "adapt_params": "head", "support_guard": False}],
)  # fmt: skip
@pytest.mark.slow
def test_the_adaptation_objective_increases_over_its_steps(bundle, rule):
    model, params = bundle.model, bundle.params
    shape = PlanShape("online_adaptation", 4, 8, 16, **rule)
    a = adapt(model, shape, params, planning_state(bundle), goal_weights(bundle),
              jax.random.key(1), knobs(steps=8), zero_delta(params, shape))  # fmt: skip
    trace = np.asarray(a.steps.objective)
    assert trace.shape == (shape.max_adaptation_steps + 1,)
    assert np.all(trace[9:] == 0.0)  # past the 8 steps taken
    trace = trace[:9]
    assert trace[-1] > trace[0]
    assert np.sum(np.diff(trace) > 0) >= 6  # rises on most steps
    assert int(a.steps.kept_step) == int(np.argmax(trace))
    assert float(a.steps.kl) > 0.0
    assert set(a.steps.delta) == set(zero_delta(params, shape))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a.steps.delta)) > 0.0


def test_the_step_count_is_an_input_up_to_the_published_maximum(bundle):
    model, params = bundle.model, bundle.params
    shape = PlanShape("online_adaptation", 4, 8, 8, max_adaptation_steps=12)
    state, weights, zero = planning_state(bundle), goal_weights(bundle), zero_delta(params, shape)
    run = jax.jit(lambda k: adapt(model, shape, params, state, weights, jax.random.key(1), k,
                                  zero))  # fmt: skip
    traces = {n: np.asarray(run(knobs(steps=n)).steps.objective) for n in (3, 7, 12, 50)}
    np.testing.assert_allclose(traces[3][:3], traces[7][:3], rtol=1e-5)  # the same first steps
    assert np.all(traces[3][4:] == 0.0) and traces[7][7] != 0.0
    np.testing.assert_array_equal(traces[50], traces[12])  # clipped to the maximum


@pytest.mark.slow
def test_large_kl_coefficient_keeps_delta_near_zero_and_plans_like_random_shooting(bundle):
    model, params = bundle.model, bundle.params
    (lstm, z), weights, key = carry_and_latent(bundle, 3), goal_weights(bundle), jax.random.key(5)
    shape = PlanShape("online_adaptation", 4, 8, 8, **ORIGINAL_RULE)

    def adapted(kl_coef):
        return plan(model, shape, params, lstm, z, weights, key, knobs(kl_coef=kl_coef, steps=10))

    def largest(delta):
        return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(delta))

    free, held = adapted(1e-6), adapted(1e6)
    assert largest(free.delta) > 1e-3
    assert largest(held.delta) == 0.0 and int(held.kept_step) == 0
    assert np.all(np.asarray(held.objective[1:11]) < float(held.objective[0]))
    shooting = plan(model, PlanShape("random_shooting", 4, 8, 8), params, lstm, z, weights, key,
                    knobs(kl_coef=1e6))  # fmt: skip
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
        delta = zero_delta(params, PlanShape.of(config)) if planner == "online_adaptation" else None
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
        delta = jax.tree.map(lambda x: jnp.stack([x] * n), zero_delta(params, shape))
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
    lstm, z = carry_and_latent(bundle)
    out = plan(model, PlanShape("controller", 4, 8, 8), params, lstm, z, goal_weights(bundle),
               jax.random.key(0), Knobs.of(bundle.config.planning))  # fmt: skip
    h = lstm[1]
    mean, _ = model.controller.apply({"params": params["controller"]}, z, h)
    np.testing.assert_allclose(np.asarray(out.action), np.clip(np.asarray(mean), -1, 1))
    assert initial_state((), 4)[0].shape == (4,)


def test_reweighting_weights_are_exp_value_over_lambda_normalised():
    values = jnp.array([0.0, 1.0, 2.0, 5.0])
    for kl_coef in (0.5, 1.0, 4.0):
        w, ess = tilt_weights(values, jnp.float32(kl_coef))
        expected = np.exp(np.asarray(values) / kl_coef)
        expected /= expected.sum()
        np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-6)
        assert float(ess) == pytest.approx(1.0 / np.sum(expected**2), rel=1e-6)
    assert float(tilt_weights(values, jnp.float32(1e6))[1]) == pytest.approx(4.0, rel=1e-4)
    assert float(tilt_weights(values, jnp.float32(1e-3))[1]) == pytest.approx(1.0, rel=1e-4)


@pytest.mark.slow
def test_adaptation_reports_the_effective_sample_size(bundle):
    model, params = bundle.model, bundle.params
    shape = PlanShape("online_adaptation", 4, 8, 16)
    ess = {
        kl_coef: float(adapt(model, shape, params, planning_state(bundle), goal_weights(bundle),
                             jax.random.key(2), knobs(kl_coef=kl_coef, steps=2),
                             zero_delta(params, shape)).ess)
        for kl_coef in (1e-3, 1e6)
    }  # fmt: skip
    assert ess[1e-3] == pytest.approx(1.0, abs=0.05)  # all weight on the best sample
    assert ess[1e6] == pytest.approx(16.0, rel=1e-3)  # uniform weights


def perturbed(tree, scale, seed=0):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise, strict=True)])


@pytest.mark.slow
def test_path_kl_is_zero_without_change_and_grows_with_a_perturbation(bundle):
    model, params = bundle.model, bundle.params
    base = params["psi_ema"]
    n = 64
    cond = jnp.broadcast_to(planning_state(bundle), (n, model.state_dim))
    noise = jax.random.normal(jax.random.key(0), (n, model.psi_dim))
    path_noise = jax.random.normal(jax.random.key(1), (4, n, model.psi_dim))

    def path_kl(psi_params):
        _, kl = sample_with_path_kl(model.predict_v, psi_params, base, model.schedule, cond,
                                    noise, path_noise)  # fmt: skip
        return float(jnp.mean(kl))

    kls = [path_kl(perturbed(base, scale)) for scale in (0.0, 0.003, 0.01, 0.03)]
    assert kls[0] < 1e-9  # (two compiled calls of one network agree to float rounding)
    assert 1e-6 < kls[1] < kls[2] < kls[3]


TWO_MODES = np.array([[-2.0, 0.0], [2.0, 0.0]])  # the prior's modes; high value lies above them


@pytest.fixture(scope="module")
def two_mode_model():
    """A world model whose psi-model (psi of 2 dimensions) is a two-mode prior, the same at
    every state, with V(psi) = 3 psi_y: values rise off the support, above the modes."""
    from training.config import parse_config
    from training.models.networks import Networks, Spaces

    config = parse_config({
        "env": "pointmaze-umaze",
        "vae": {"latent_dim": 2, "hidden": [8]},
        "mdn": {"hidden": 4, "n_mixtures": 1},
        "successor": {"n_features": 1, "hidden": 64, "depth": 2, "diffusion_steps": 100},
        "readout": {"hidden": 8, "depth": 1},
    })  # fmt: skip
    model = Networks.build(config, Spaces((4,), "vector", (-1.0, -1.0), (1.0, 1.0)))
    params = model.init(jax.random.key(0))
    tx = optax.adam(3e-3)
    cond = jnp.zeros((256, model.state_dim))

    @jax.jit
    def step(psi, opt_state, key):
        k_mode, k_x, k_loss = jax.random.split(key, 3)
        centres = jnp.asarray(TWO_MODES)[jax.random.randint(k_mode, (256,), 0, 2)]
        x = centres + 0.3 * jax.random.normal(k_x, (256, 2))
        loss_fn = lambda p: v_loss(model.predict_v, p, model.schedule, x, cond, k_loss)  # noqa: E731
        updates, opt_state = tx.update(jax.grad(loss_fn)(psi), opt_state)
        return optax.apply_updates(psi, updates), opt_state

    psi, opt_state = params["psi"], tx.init(params["psi"])
    for i in range(1500):
        psi, opt_state = step(psi, opt_state, jax.random.key(i + 1))
    return model, {**params, "psi": psi, "psi_ema": psi}


def off_support_fraction(model, params, delta, n=512):
    noise = jax.random.normal(jax.random.key(123), (n, 2))
    psi = model.sample_psi(with_delta(params["psi_ema"], delta), jnp.zeros((n, model.state_dim)),
                           noise, 10)  # fmt: skip
    distance = np.min(np.linalg.norm(np.asarray(psi)[:, None] - TWO_MODES, axis=-1), axis=-1)
    return float(np.mean(distance > 1.0)), float(np.mean(np.asarray(psi)[:, 1]))


@pytest.mark.slow
def test_reweighted_adaptation_stays_in_support_where_the_original_rule_leaves_it(two_mode_model):
    model, params = two_mode_model
    state, weights = jnp.zeros(model.state_dim), jnp.array([0.0, 3.0])
    prior_off, prior_y = off_support_fraction(model, params, {})
    assert prior_off < 0.05  # the prior lies on its two modes

    def adapted(rule, kl_coef):
        shape = PlanShape("online_adaptation", 10, 32, 256, **rule, adapt_params="all",
                          support_guard=False)  # fmt: skip
        a = adapt(model, shape, params, state, weights, jax.random.key(1),
                  knobs(lr=1e-2, kl_coef=kl_coef, steps=30), zero_delta(params, shape))  # fmt: skip
        return off_support_fraction(model, params, a.steps.delta)

    original_off, original_y = adapted({"adaptation": "gradient", "kl_estimator": "proxy"}, 0.01)
    assert original_y > prior_y + 0.5 and original_off > 0.5  # pushed off the modes, upwards
    for fit in (None, 32):  # every prior sample, or the 32 heaviest of 256
        tilted_off, tilted_y = adapted({"adaptation": "reweighted", "n_fit_samples": fit}, 0.3)
        assert tilted_y > prior_y  # leaning to the higher values ...
        assert tilted_off < 0.1  # ... that the prior's own samples have


def test_the_fit_keeps_the_heaviest_samples_with_their_weights_renormalised():
    prior = jnp.arange(12.0).reshape(6, 2)
    w = jnp.array([0.05, 0.4, 0.12, 0.3, 0.05, 0.08])
    kept, w_kept = heaviest(prior, w, 3)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(prior)[[1, 3, 2]])
    np.testing.assert_allclose(np.asarray(w_kept), np.array([0.4, 0.3, 0.12]) / 0.82, rtol=1e-6)


@pytest.mark.slow
def test_the_guard_falls_back_when_delta_is_off_support(two_mode_model):
    model, params = two_mode_model
    state, weights = jnp.zeros(model.state_dim), jnp.array([0.0, 3.0])
    shape = PlanShape("online_adaptation", 10, 32, 64)
    zero = zero_delta(params, shape)
    # The output bias shifts every prediction of v, so every sample, off the modes.
    shifted = {"out": {**zero["out"], "bias": jnp.array([0.0, -3.0])}}

    def run(delta):
        return adapt(model, shape, params, state, weights, jax.random.key(4), knobs(steps=0), delta)

    off = run(shifted)
    assert bool(off.fallback)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(off.steps.delta))
    distance = np.min(np.linalg.norm(np.asarray(off.psi) - TWO_MODES, axis=-1))
    assert distance < 1.0  # the prior's own sample was chosen
    assert not bool(run(zero).fallback)


def test_the_leave_one_out_density_is_higher_inside_a_cluster_than_alone():
    rng = np.random.default_rng(0)
    cluster = rng.normal(0.0, 0.1, (20, 3))
    samples = jnp.asarray(np.concatenate([cluster, [[3.0, 3.0, 3.0]]]), jnp.float32)
    alone = jnp.eye(len(samples), dtype=bool)
    density = np.asarray(log_density(samples, samples, alone))
    assert density[-1] < density[:-1].min() - 10.0  # far from every other sample
    # Without leaving itself out, each sample would see itself: the lone one looks dense.
    with_self = np.asarray(log_density(samples, samples, jnp.zeros_like(alone)))
    assert with_self[-1] > density[-1] + 10.0


def test_the_tilted_mode_prefers_a_well_supported_outcome_to_a_lone_slightly_better_one():
    rng = np.random.default_rng(1)
    cluster = rng.normal(0.0, 0.1, (31, 2))
    samples = jnp.asarray(np.concatenate([cluster, [[4.0, 4.0]]]), jnp.float32)
    values = jnp.asarray(np.concatenate([np.full(31, 5.0) + 0.01 * np.arange(31), [6.0]]))
    alone = jnp.eye(len(samples), dtype=bool)

    def chosen(choice, kl_coef):
        scores = choice_scores(choice, values, samples, samples, alone, jnp.float32(kl_coef))
        return int(jnp.argmax(scores))

    assert chosen("max_value", 1.0) == 31  # the lone sample has the highest V
    assert chosen("tilted_mode", 1.0) != 31  # V / λ + log p: the cluster's best wins
    assert chosen("tilted_mode", 1e-6) == 31  # λ -> 0: the mode of q* is the argmax of V


@pytest.mark.parametrize("planner", ["random_shooting", "online_adaptation"])
def test_both_choice_rules_plan_with_a_real_bundle(bundle, planner):
    plans = {
        choice: plan(
            bundle.model,
            PlanShape(planner, 4, 16, 16, support_guard=False, choice=choice),
            bundle.params,
            *carry_and_latent(bundle),
            goal_weights(bundle),
            jax.random.key(3),
            knobs(kl_coef=1.0, steps=2),
        )  # fmt: skip
        for choice in ("max_value", "tilted_mode")
    }
    for p in plans.values():
        assert np.all(np.isfinite(np.asarray(p.action))) and np.isfinite(float(p.value))
    # The same samples (no guard to tell the rules apart): the highest V is at least the V
    # the tilted mode chose.
    assert float(plans["max_value"].value) >= float(plans["tilted_mode"].value) - 1e-5


def test_an_action_chunk_plans_again_at_each_state_m_imagines(bundle):
    """action_horizon 3: the first action is the one-action decision's; each next one is
    the plan at the z M predicts after the action before, and M's state has consumed all
    three."""
    model, params = bundle.model, bundle.params
    config = bundle.config.planning.model_copy(update={"planner": "random_shooting"})
    one = PlanShape.of(config)
    three = PlanShape.of(config.model_copy(update={"action_horizon": 3}))
    obs = jnp.asarray([0.5, -0.5, 0.1, 0.0])
    lstm = initial_state((), model.mdn.hidden)
    weights, key, k = goal_weights(bundle), jax.random.key(4), Knobs.of(config)
    single = compile_decide(model, one)(params, lstm, obs, weights, key, k, None)
    chunk = compile_decide(model, three)(params, lstm, obs, weights, key, k, None)
    assert chunk.actions.shape == (3, model.spaces.action_dim)
    np.testing.assert_allclose(chunk.actions[0], single.plan.action, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunk.plan.action, single.plan.action, rtol=1e-5, atol=1e-6)
    # By hand: M's prediction after the first action, the plan there, and so on.
    step = lambda state, z, a: model.mdn.apply(  # noqa: E731
        {"params": params["mdn"]}, state, z, a, method=MDNRNN.step
    )
    state, out = step(lstm, model.encode(params, obs), single.plan.action)
    for i in (1, 2):
        z = most_likely_latent(out)
        p = plan(model, three, params, state, z, weights, jax.random.fold_in(key, i), k)
        np.testing.assert_allclose(chunk.actions[i], p.action, rtol=1e-4, atol=1e-5)
        state, out = step(state, z, p.action)
    np.testing.assert_allclose(chunk.lstm[1], state[1], rtol=1e-4, atol=1e-5)
    assert not np.allclose(chunk.actions[1], chunk.actions[0])  # it did plan again


def test_imagination_values_an_action_by_the_states_m_imagines_for_it(bundle):
    """With one candidate the planner's value is that action's imagined return, rolled by
    hand here: M's most likely latents, the reward of their decodings, the psi-model's
    value at the last; and among candidates it keeps the one worth most."""
    model, params = bundle.model, bundle.params
    lstm, z = carry_and_latent(bundle, 1)
    weights, key, k = goal_weights(bundle), jax.random.key(3), Knobs.of(bundle.config.planning)
    one = PlanShape("imagination", 4, 1, 8, imagination_steps=5)
    p = plan(model, one, params, lstm, z, weights, key, k)
    gamma = bundle.config.successor.gamma
    carry, latent, expected = lstm, z, 0.0
    for t in range(1, 6):
        carry, out = model.mdn.apply({"params": params["mdn"]}, carry, latent, p.action,
                                     method=MDNRNN.step)  # fmt: skip
        latent = most_likely_latent(out)
        if t < 5:
            expected += gamma**t * float(model.imagined_phi(params, latent) @ weights)
    last = jnp.concatenate([latent, carry[1]])
    noise = jax.random.normal(jax.random.split(key)[1], (TERMINAL_SAMPLES, model.psi_dim))
    psi = model.sample_psi(params["psi_ema"], jnp.broadcast_to(last, (TERMINAL_SAMPLES,
                           last.shape[0])), noise, 4)  # fmt: skip
    rewards = expected + gamma**5 * float(model.imagined_phi(params, latent) @ weights)
    expected += gamma**5 * float(jnp.mean(value_fn(params, weights)(psi)))
    assert float(p.value) == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # Without the psi-model's value, the last state counts by its reward like the others.
    alone = plan(model, replace(one, imagination_value=False), params, lstm, z, weights, key, k)
    np.testing.assert_allclose(alone.action, p.action)  # one candidate: the same action
    assert float(alone.value) == pytest.approx(rewards, rel=1e-4, abs=1e-4)
    many = plan(model, PlanShape("imagination", 4, 16, 8, imagination_steps=5), params, lstm, z,
                weights, key, k)  # fmt: skip
    assert float(many.value) >= float(many.objective[0])  # the best, not the mean, is kept
    # Rounds of the cross-entropy method start from the same draw and keep the best seen.
    rounds = PlanShape("imagination", 4, 16, 8, imagination_steps=5, imagination_rounds=3)
    refined = plan(model, rounds, params, lstm, z, weights, key, k)
    assert float(refined.objective[0]) == pytest.approx(float(many.objective[0]))
    assert float(refined.value) >= float(many.value)
    assert bool(jnp.all(jnp.abs(refined.action) <= 1.0))
    assert float(many.value) > float(p.value) or np.allclose(many.action, p.action)


@pytest.mark.slow
def test_a_warm_prior_draws_from_the_last_decisions_adapted_model(two_mode_model):
    model, params = two_mode_model
    state, weights = jnp.zeros(model.state_dim), jnp.array([1.0, 0.0])  # the right mode wins
    shape = PlanShape("online_adaptation", 10, 32, 256, adapt_params="all", support_guard=False)
    zero = zero_delta(params, shape)
    learned = adapt(model, shape, params, state, weights, jax.random.key(1),
                    knobs(lr=1e-2, kl_coef=0.3, steps=30), zero).steps.delta  # fmt: skip

    def prior_mean_value(source, delta):
        s = replace(shape, prior_source=source)
        a = adapt(model, s, params, state, weights, jax.random.key(2), knobs(steps=0), delta)
        return float(a.value_before)

    # No warm start: the same samples either way. A learned one: the warm prior leans right.
    assert prior_mean_value("warm", zero) == prior_mean_value("base", zero)
    base, warm = prior_mean_value("base", learned), prior_mean_value("warm", learned)
    assert abs(base) < 0.5 and warm > base + 1.0
