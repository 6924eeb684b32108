"""The end_to_end and alternating modes: each piece of their mathematics on a case whose
answer is known, and each mode trained for a few steps into a bundle the planners load."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from service.cli import main as cli_main
from tests.conftest import TINY, decide_once
from training.analysis.bench_train import parse_modes
from training.config import ConfigError, parse_config
from training.data.datasets import collect, load_sequences, open_dataset
from training.learning import joint
from training.learning.checkpoint import restore_bundle
from training.learning.loop import read_metrics, train
from training.learning.losses import info_nce_logits, info_nce_loss, loss_weights, reinforce_loss
from training.learning.optim import gradient_clipping
from training.learning.stage_inputs import device_data, real_frames, spaces_of
from training.models.controller import gaussian_log_prob
from training.models.mdn_rnn import MDNRNN, initial_state, unroll
from training.models.networks import Networks, observation_stats


def joint_config(mode: str, joint_section: dict | None = None, **train) -> dict:
    """TINY with a short joint stage and shorter successor-feature stages."""
    raw = copy.deepcopy(TINY)
    raw["train"] = {
        **raw["train"],
        "mode": mode,
        "joint_steps": 8,
        "psi_steps": 4,
        "readout_steps": 4,
        "value_steps": 4,
        "checkpoint_every": 4,
        "log_every": 2,
        **train,
    }
    raw["joint"] = {"epoch_steps": 1, **(joint_section or {})}
    raw["successor"] = {**raw["successor"], "mc_warmup_steps": 2}
    return raw


# --- the pieces ------------------------------------------------------------------------


def test_schedule_values_at_given_steps():
    def at(step):
        w = loss_weights(step, 1.0, 2.0, 0.1, policy_warmup_steps=10_000, recon_decay_steps=50_000)
        return {k: float(v) for k, v in w.items()}

    assert at(0) == pytest.approx({"vae": 1.0, "mdn": 2.0, "policy": 0.0})
    assert at(5_000) == pytest.approx({"vae": 0.9, "mdn": 2.0, "policy": 0.05})
    assert at(10_000) == pytest.approx({"vae": 0.8, "mdn": 2.0, "policy": 0.1})
    assert at(25_000) == pytest.approx({"vae": 0.5, "mdn": 2.0, "policy": 0.1})
    assert at(45_000)["vae"] == pytest.approx(0.1)
    assert at(200_000) == pytest.approx({"vae": 0.1, "mdn": 2.0, "policy": 0.1})
    # The lengths come from the config, and the schedule can be switched off.
    config = parse_config(
        joint_config(
            "end_to_end", {"policy_warmup_steps": 10, "recon_decay_steps": 20, "recon_floor": 0.2}
        )
    )
    w = joint.scheduled_weights(config, 5)
    assert float(w["policy"]) == pytest.approx(0.05) and float(w["vae"]) == pytest.approx(0.75)
    assert float(joint.scheduled_weights(config, 100)["vae"]) == pytest.approx(0.2)
    fixed = parse_config(joint_config("end_to_end", {"schedule": False}))
    assert float(joint.scheduled_weights(fixed, 0)["policy"]) == pytest.approx(0.1)


def test_alternating_phases_follow_the_epochs():
    config = parse_config(
        joint_config(
            "alternating",
            {"world_epochs": 2, "controller_epochs": 3, "joint_epochs": 1, "epoch_steps": 2},
        )
    )
    phases = [joint.phase_at(config, step) for step in range(14)]
    assert phases == ["world"] * 4 + ["controller"] * 6 + ["joint"] * 2 + ["world"] * 2


@pytest.fixture(scope="module")
def umaze_setup(umaze_data):
    """A model and the joint stage's inputs on the tiny dataset, without training."""

    def build(raw: dict):
        config = parse_config(raw)
        seqs = load_sequences(umaze_data, config.data.seq_len)
        model = Networks.build(config, spaces_of(open_dataset(umaze_data), seqs))
        params = model.init(jax.random.key(0))
        params["normaliser"] = observation_stats(real_frames(seqs), "vector")
        inputs = joint.prepare(config, device_data(seqs), seqs.episode)
        return model, params, inputs

    return build


def leaves_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.all(x == y)), a, b)))


@pytest.mark.slow
def test_a_frozen_module_is_unchanged_by_its_alternating_phase(umaze_setup):
    raw = joint_config("alternating", {"world_epochs": 1, "controller_epochs": 1, "epoch_steps": 2})
    model, params, inputs = umaze_setup(raw)
    config = model.config
    update = joint.make_update(model, start=0)
    opt_states = joint.init_opt_state(config, params)
    key = jax.random.key(1)

    def run(params, opt_states, steps):
        for step in steps:
            params, opt_states, metrics = update(params, opt_states, inputs, key, step)
        return params, opt_states, metrics

    # steps 0-1: world epochs, C frozen; the policy term is off
    world, opt_states, metrics = run(params, opt_states, [0, 1])
    assert leaves_equal(world["controller"], params["controller"])
    assert not leaves_equal(world["vae"], params["vae"])
    assert not leaves_equal(world["mdn"], params["mdn"])
    assert float(metrics["lam_policy"]) == 0.0
    # steps 2-3: controller epochs, V and M frozen
    ctrl, opt_states, metrics = run(world, opt_states, [2, 3])
    assert leaves_equal(ctrl["vae"], world["vae"]) and leaves_equal(ctrl["mdn"], world["mdn"])
    assert not leaves_equal(ctrl["controller"], world["controller"])
    assert float(metrics["lam_vae"]) == 0.0


@pytest.mark.slow
def test_truncated_bptt_stops_gradients_at_chunk_boundaries():
    mdn = MDNRNN(latent_dim=3, hidden=8, n_mixtures=2)
    zs = jax.random.normal(jax.random.key(0), (2, 8, 3))
    actions = jax.random.normal(jax.random.key(1), (2, 8, 1))
    state = initial_state((2,), 8)
    params = mdn.init(jax.random.key(2), state, zs[:, 0], actions[:, 0], method=MDNRNN.step)
    params = params["params"]

    def grad_of_step_5(chunk):
        def loss(zs):
            _, hs, out = unroll(mdn, params, state, zs, actions, chunk)
            return jnp.sum(out.mu[:, 5]) + jnp.sum(hs[:, 5])

        return jnp.abs(jax.grad(loss)(zs)).sum(axis=(0, 2))  # per time step

    truncated = grad_of_step_5(4)  # chunks [0, 4) and [4, 8)
    assert np.all(truncated[:4] == 0.0)  # across the boundary: none
    assert np.all(truncated[4:6] > 0.0)  # within step 5's chunk: some
    full = grad_of_step_5(None)
    assert np.all(full[:6] > 0.0)  # full BPTT reaches back to the start
    # The forward pass is the same: the state is carried, only its gradient stops.
    full_out = unroll(mdn, params, state, zs, actions, None)[2]
    chunked_out = unroll(mdn, params, state, zs, actions, 4)[2]
    np.testing.assert_allclose(full_out.mu, chunked_out.mu, rtol=1e-5, atol=1e-6)


def test_infonce_ranks_the_positive_first_on_separable_data():
    key = jax.random.key(0)
    n, k, dim = 64, 8, 16
    centres = jax.random.normal(key, (n, dim))  # one per trajectory
    noise = lambda i, shape: 0.05 * jax.random.normal(jax.random.key(i), shape)  # noqa: E731
    anchor = centres + noise(1, (n, dim))
    positive = centres + noise(2, (n, dim))  # the next frame of the same trajectory
    others = (jnp.arange(n)[:, None] + 1 + jnp.arange(k)[None]) % n  # other trajectories
    negatives = centres[others] + noise(3, (n, k, dim))
    logits = info_nce_logits(anchor, positive, negatives, temperature=0.1)
    assert logits.shape == (n, 1 + k)
    assert np.all(np.argmax(logits, axis=-1) == 0)
    ones, mask = jnp.ones((n, k)), jnp.ones(n)
    loss = float(info_nce_loss(logits, ones, mask))
    assert loss < 0.1 * np.log(1 + k)  # chance is log(1 + K)
    # A positive from another trajectory is not ranked first, and the loss says so.
    wrong = info_nce_logits(anchor, jnp.roll(positive, 1, axis=0), negatives, 0.1)
    assert np.mean(np.argmax(wrong, axis=-1) == 0) < 0.2
    assert float(info_nce_loss(wrong, ones, mask)) > 10 * loss
    # A negative from the same trajectory (invalid) is left out of the loss.
    same = negatives.at[:, 0].set(positive)
    valid = ones.at[:, 0].set(0.0)
    masked = float(info_nce_loss(info_nce_logits(anchor, positive, same, 0.1), valid, mask))
    assert masked < 0.1 * np.log(1 + k)
    # A zero latent (a padding frame's, from a bias-free encoder) masked out of the loss
    # leaves its gradient finite.
    padded = negatives.at[:, 0].set(0.0)

    def padded_loss(negatives):
        return info_nce_loss(info_nce_logits(anchor, positive, negatives, 0.1), valid, mask)

    assert np.all(np.isfinite(jax.grad(padded_loss)(padded)))


def test_meta_step_moves_the_weights_towards_lower_validation_loss():
    """theta trains on l_a (theta - 1)^2 + l_b (theta + 1)^2; validation wants theta = 1,
    so raising l_a and lowering l_b lowers the validation loss after the inner loop."""

    def inner_step(theta, lambdas, key):
        loss = lambda t: lambdas["a"] * (t - 1.0) ** 2 + lambdas["b"] * (t + 1.0) ** 2  # noqa: E731
        return theta - 0.1 * jax.grad(loss)(theta), loss(theta)

    def validation(theta):
        return (theta - 1.0) ** 2

    keys = jax.random.split(jax.random.key(0), 5)
    meta_tx = optax.sgd(0.5)
    lambdas = {"a": jnp.float32(1.0), "b": jnp.float32(1.0)}

    def after_inner(lambdas):
        theta = jnp.float32(0.0)
        for key in keys:
            theta, _ = inner_step(theta, lambdas, key)
        return float(validation(theta))

    _, new, _, val, losses = joint.meta_gradient_step(
        inner_step, validation, lambdas, jnp.float32(0.0), keys, meta_tx, meta_tx.init(lambdas)
    )
    assert losses.shape == (5,) and float(val) == pytest.approx(after_inner(lambdas))
    assert float(new["a"]) > 1.0 and float(new["b"]) < 1.0
    assert after_inner(new) < after_inner(lambdas)
    # The weights are clamped at 0.
    big = optax.sgd(100.0)
    _, clamped, _, _, _ = joint.meta_gradient_step(
        inner_step, validation, lambdas, jnp.float32(0.0), keys, big, big.init(lambdas)
    )
    assert float(clamped["b"]) == 0.0 and float(clamped["a"]) > 1.0


def test_clipping_bounds_the_update():
    grads = {"w": jnp.arange(-50.0, 50.0), "b": jnp.array([300.0])}
    sgd = optax.chain(gradient_clipping(1.0), optax.sgd(1.0))
    updates, _ = sgd.update(grads, sgd.init(grads))
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)
    small = jax.tree.map(lambda g: 1e-3 * g / optax.tree.norm(grads), grads)
    kept, _ = sgd.update(small, sgd.init(small))
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), kept, small)
    per_value = optax.chain(gradient_clipping(1e6, clip_value=0.5), optax.sgd(1.0))
    updates, _ = per_value.update(grads, per_value.init(grads))
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) == 0.5
    assert float(updates["w"][50]) == 0.0  # small entries pass unchanged


def test_reinforce_gradient_matches_the_analytic_one_on_a_one_step_gaussian():
    """a ~ N(mu, sigma), r(a) = -(a - c)^2, so E[r] = -((mu - c)^2 + sigma^2): the
    gradient of E[r] is -2 (mu - c) in mu and -2 sigma^2 in log sigma."""
    mu, log_std, c, n = 0.3, jnp.log(0.5), 1.0, 400_000
    actions = mu + jnp.exp(log_std) * jax.random.normal(jax.random.key(0), (n, 1))
    rewards = -jnp.square(actions[:, 0] - c)

    def loss(theta):
        log_prob = gaussian_log_prob(actions, theta[0], theta[1])
        return reinforce_loss(log_prob, rewards, jnp.ones(n))[0]

    grad = jax.grad(loss)(jnp.array([mu, log_std]))
    sigma = float(jnp.exp(log_std))
    analytic = -np.array([-2 * (mu - c), -2 * sigma**2])  # the loss is minus the return
    np.testing.assert_allclose(grad, analytic, rtol=0.03)


def test_joint_configs_are_checked():
    with pytest.raises(ConfigError, match="train.tbptt 3 must divide data.seq_len 8"):
        parse_config(joint_config("end_to_end", tbptt=3))
    with pytest.raises(ConfigError, match="need mode end_to_end"):
        parse_config(joint_config("staged", tbptt=4))
    with pytest.raises(ConfigError, match="schedule: false"):
        parse_config(joint_config("end_to_end", {"meta_learning": True}))
    with pytest.raises(ConfigError, match="joint.policy_loss"):
        parse_config(joint_config("end_to_end", {"policy_loss": "ppo"}))
    with pytest.raises(ConfigError, match="train.mode"):
        parse_config(joint_config("jointly"))
    staged = parse_config(TINY).train
    stages = ["vae", "mdn", "controller", "geometry", "psi", "readout", "value"]
    assert list(staged.stage_steps()) == stages
    e2e = parse_config(joint_config("end_to_end")).train
    assert list(e2e.stage_steps()) == ["joint", "geometry", "psi", "readout", "value"]


# --- each mode trains into a bundle the planners load ----------------------------------


@pytest.fixture(scope="module")
def pendulum_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pendulum"
    collect("pendulum", 3, out, seed=2, max_episode_steps=24, progress=False)
    return out


def pendulum_config(mode: str, joint_section: dict | None = None, **train) -> dict:
    raw = joint_config(mode, joint_section, value_steps=0, **train)
    raw["env"] = "pendulum"
    raw["successor"] = {k: v for k, v in raw["successor"].items() if k != "feature_dims"}
    raw.pop("value")
    return raw


@pytest.mark.parametrize(
    ("mode", "joint_section", "train_section"),
    [
        ("end_to_end", {}, {}),
        ("alternating", {"aux_losses": True, "policy_loss": "imagination"}, {"tbptt": 2}),
    ],
)
@pytest.mark.slow
def test_each_mode_trains_a_pendulum_bundle_the_planners_load(
    mode, joint_section, train_section, pendulum_data, tmp_path
):
    """PointMaze in these modes: tests/test_train.py's resume tests, which load their
    bundles in the planners too."""
    config = parse_config(pendulum_config(mode, joint_section, clip_value=0.5, **train_section))
    result = train(config, pendulum_data, tmp_path / "run", progress=False)
    assert result.summary["joint"]["step"] == 8
    assert "vae" not in result.summary and "readout" in result.summary
    joint_rows = [m for m in read_metrics(tmp_path / "run") if m["stage"] == "joint"]
    assert all(np.isfinite(m["loss"]) for m in joint_rows)
    assert {"lam_vae", "lam_mdn", "lam_policy", "recon", "nll", "term_policy"} <= set(joint_rows[0])
    actions = decide_once(tmp_path / "run")
    assert actions.shape == (2, 1) and np.all(np.isfinite(actions))


@pytest.mark.slow
def test_staged_auxiliary_losses_train_with_v_and_shape_it(pendulum_data, tmp_path):
    """staged + aux_losses: V's stage trains V and the value head on the auxiliary
    losses too (so V ends elsewhere than without them), and no later stage moves the head."""
    # Three checkpoints (the ends of V's, M's and C's stages): all are kept.
    short = {"vae_steps": 4, "mdn_steps": 2, "controller_steps": 2, "psi_steps": 0}
    short |= {"readout_steps": 0, "checkpoint_every": 4}
    runs = {}
    for aux in (False, True):
        config = parse_config(pendulum_config("staged", {"aux_losses": aux}, **short))
        runs[aux] = train(config, pendulum_data, tmp_path / f"aux-{aux}", progress=False)
    vae_rows = [m for m in read_metrics(tmp_path / "aux-True") if m["stage"] == "vae"]
    assert {"term_value_head", "term_infonce", "recon"} <= set(vae_rows[0])
    assert "value_head" not in runs[False].params
    bundle = restore_bundle(tmp_path / "aux-True", step=4)  # the end of V's stage
    after_vae = bundle.params["value_head"]
    init_key = jax.random.split(jax.random.key(config.seed))[0]  # as train() draws it
    first = bundle.model.init(init_key)["value_head"]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), after_vae, first)
    assert max(jax.tree.leaves(moved)) > 0.0
    jax.tree.map(np.testing.assert_array_equal, after_vae, runs[True].params["value_head"])
    differ = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), runs[False].params["vae"], runs[True].params["vae"]
    )
    assert any(jax.tree.leaves(differ))


@pytest.mark.slow
def test_compare_runs_every_run_on_the_same_episodes(trained, tmp_path):
    out = tmp_path / "compare"
    run = str(trained.run_dir)
    argv = ["compare", run, run, "--episodes", "2", "--max-steps", "5", "--out", str(out)]
    assert cli_main([*argv, "--quiet"]) == 0
    record = json.loads((out / "compare.json").read_text())
    rows = record["runs"]
    assert len(rows) == 2 and rows[0]["label"] == "staged"
    # The same bundle twice: the same episodes give the same returns, the same windows
    # the same losses.
    assert rows[0]["returns"] == rows[1]["returns"] and len(rows[0]["returns"]) == 2
    assert rows[0]["recon"] == rows[1]["recon"] and np.isfinite(rows[0]["nll"])
    assert rows[0]["training"]["steps"] == 60  # V, M and C of the staged run
    assert "| tiny | staged |" in (out / "compare.md").read_text()
    # Runs of one configuration are gathered: two runs, one mean, an interval of width 0.
    [group] = record["by_configuration"]
    assert group["runs"] == 2 and group["mean_return"] == pytest.approx(rows[0]["mean_return"])
    assert group["return_interval"] == pytest.approx([group["mean_return"]] * 2)
    assert "| staged | 2 |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_joint_modes_train_on_carracing_pixels_with_a_small_config(tmp_path):
    """The convolutional V in the joint modes, with TBPTT and the auxiliary losses, ending
    with C searched on frames (end_to_end: in the real environment, alternating: in the
    dream): a bundle the planners load. The convolutional V's own training is
    test_models' (test_conv_vae_shapes_and_loss_decreases)."""
    collect("carracing", 2, tmp_path / "car", seed=0, max_episode_steps=12, progress=False)
    searched = {"end_to_end": "cmaes_env", "alternating": "cmaes_dream"}
    for mode in ("end_to_end", "alternating"):
        raw = {
            "env": "carracing",
            "data": {"seq_len": 8},
            "vae": {"latent_dim": 4},
            "mdn": {"hidden": 16, "n_mixtures": 2},
            "successor": {**TINY["successor"], "cumulant_input": "latent", "batch_size": 8},
            "readout": {"hidden": 32},
            "joint": {"epoch_steps": 1, "aux_losses": True},
            "evolution": {"population": 2, "rollouts": 1, "horizon": 3, "max_episode_steps": 4},
            "train": {
                "mode": mode,
                "controller": searched[mode],
                "batch_size": 2,
                **{f"{stage}_steps": 2 for stage in ("vae", "mdn", "controller", "psi")},
                "joint_steps": 3,  # alternating: one step of each phase
                "readout_steps": 2,
                "value_steps": 0,
                "log_every": 1,
                "tbptt": 4,
            },
        }
        raw["successor"].pop("feature_dims")
        result = train(parse_config(raw), tmp_path / "car", tmp_path / mode, progress=False)
        rows = read_metrics(tmp_path / mode)
        assert all(np.isfinite(m["loss"]) for m in rows)
        assert np.isfinite(result.summary["joint"]["recon"])
        assert result.summary["controller"]["step"] == result.step - 4  # then psi, readout
        actions = decide_once(tmp_path / mode)
        assert actions.shape == (2, 3) and np.all(np.isfinite(actions))


@pytest.mark.slow
def test_bench_train_times_each_named_mode(umaze_data, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(TINY))  # YAML reads JSON
    out = tmp_path / "bench"
    argv = ["bench-train", "--config", str(config), "--data", str(umaze_data), "--quiet"]
    argv += ["--steps", "2", "--repeats", "1", "--modes", "staged,alternating"]
    assert cli_main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "bench_train.json").read_text())
    parts = [(r["mode"], r["part"]) for r in report["rows"]]
    assert parts == [("staged", s) for s in ("vae", "mdn", "controller")] + [
        ("alternating", p) for p in ("world", "controller", "joint")
    ]
    assert all(r["steps_per_second"] > 0 for r in report["rows"])
    assert report["devices"] == 1 and "| alternating | joint |" in capsys.readouterr().out
    assert cli_main([*argv[:-1], "staged,jointly", "--out", str(tmp_path / "x")]) == 2
    assert "unknown modes ['jointly']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    named = "staged, C by cmaes_dream,end_to_end,end_to_end, tbptt 8"
    assert parse_modes(named) == ["staged, C by cmaes_dream", "end_to_end", "end_to_end, tbptt 8"]


def test_meta_learnings_validation_measures_the_policy(pendulum_data):
    """The outer step's objective on held-out windows sees C, through the imagined return
    per step (bounded as M's rewards are): with V's and M's fit alone it did not, and
    meta-learning switched the policy term off."""
    config = parse_config(pendulum_config("end_to_end", {"meta_learning": True, "schedule": False}))
    seqs = load_sequences(pendulum_data, config.data.seq_len)
    model = Networks.build(config, spaces_of(open_dataset(pendulum_data), seqs))
    params = model.init(jax.random.key(0))
    rows = np.arange(len(seqs.episode))
    batch = joint.make_windows(device_data(seqs), seqs.episode, rows, config.controller.gamma)

    def validation(params):
        terms, metrics = joint.joint_terms(model, params, batch, jax.random.key(1), "measure")
        return sum(terms[k] for k in joint.VALIDATION_TERMS), terms["policy"], metrics

    other_c = model.init(jax.random.key(5))["controller"]
    before, measure, metrics = validation(params)
    after, _, _ = validation({**params, "controller": other_c})
    assert float(before) != float(after)
    horizon = config.joint.imagination_horizon
    assert float(measure) == pytest.approx(-float(metrics["imagined_return"]) / horizon)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["reinforce", "imagination"])
def test_the_controllers_window_trainers_move_c_alone(trainer, pendulum_data, tmp_path):
    """C's stage by REINFORCE or the imagined return, after a joint stage: C moves from where
    the joint stage left it, V and M stay as the joint stage left them."""
    short = {"joint_steps": 3, "controller_steps": 3, "psi_steps": 0, "readout_steps": 0,
             "checkpoint_every": 3, "controller": trainer}  # fmt: skip
    config = parse_config(pendulum_config("end_to_end", **short))
    result = train(config, pendulum_data, tmp_path / "run", progress=False)
    last = result.summary["controller"]
    assert last["step"] == 6 and np.isfinite(last["loss"])
    after_joint = restore_bundle(tmp_path / "run", step=3).params
    for group in ("vae", "mdn"):
        jax.tree.map(np.testing.assert_array_equal, after_joint[group], result.params[group])
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after_joint["controller"],
                         result.params["controller"])  # fmt: skip
    assert any(jax.tree.leaves(moved))
