"""Shapes and dtypes of V, M and C, and each loss decreasing on a small fixed batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from training.config import parse_config
from training.learning.losses import (
    discounted_returns,
    mdn_loss,
    return_weights,
    vae_loss,
    weighted_bc_loss,
)
from training.learning.stage_inputs import Transitions, psi_statistics
from training.learning.stages import psi_objective, readout_objective
from training.models.controller import Controller, gaussian_log_prob
from training.models.mdn_rnn import MDNRNN, initial_state, sample_next_latent
from training.models.networks import Networks, Spaces, normalise, observation_stats
from training.models.vae import ConvVAE, VectorVAE

KEY = jax.random.key(0)


def fit(loss_fn, params, steps=60, lr=3e-3):
    """Adam on a fixed batch; returns the loss before and after."""
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    first, _ = grad_fn(params)
    for _ in range(steps):
        loss, grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    return float(first), float(grad_fn(params)[0])


@pytest.mark.slow
def test_vector_vae_shapes_and_loss_decreases():
    vae = VectorVAE(obs_dim=4, latent_dim=3, hidden=(16,))
    x = jax.random.normal(KEY, (16, 4))
    params = vae.init(KEY, x, KEY)["params"]
    recon, mu, logvar, z = vae.apply({"params": params}, x, KEY)
    assert recon.shape == (16, 4) and mu.shape == logvar.shape == z.shape == (16, 3)
    assert recon.dtype == mu.dtype == jnp.float32
    seq = jnp.zeros((2, 5, 4))
    assert vae.apply({"params": params}, seq, method="encode")[0].shape == (2, 5, 3)

    def loss(p):
        r, m, lv, _ = vae.apply({"params": p}, x, jax.random.key(1))
        return vae_loss(r, x, m, lv, kl_tolerance=0.0)[0]

    before, after = fit(loss, params)
    assert after < 0.7 * before


@pytest.mark.slow
def test_conv_vae_shapes_and_loss_decreases():
    vae = ConvVAE(latent_dim=8, channels=(4, 8, 8, 16))
    ramp = jnp.linspace(0.0, 1.0, 64)[None, :, None, None]
    colours = jnp.array([[0.1, 0.9, 0.2], [0.8, 0.1, 0.1], [0.0, 0.3, 1.0], [0.9, 0.9, 0.0]])
    x = jnp.broadcast_to(ramp * colours[:, None, None, :], (4, 64, 64, 3))  # distinct gradients
    params = vae.init(KEY, x, KEY)["params"]
    recon, mu, logvar, z = vae.apply({"params": params}, x, KEY)
    assert recon.shape == (4, 64, 64, 3) and mu.shape == (4, 8)
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0
    assert vae.apply({"params": params}, x[None], method="encode")[0].shape == (1, 4, 8)

    def loss(p):
        r, m, lv, _ = vae.apply({"params": p}, x, jax.random.key(1))
        return vae_loss(r, x, m, lv, kl_tolerance=0.0)[0]

    before, after = fit(loss, params, steps=30)
    assert after < 0.5 * before


@pytest.mark.slow
def test_mdn_rnn_shapes_sampling_and_loss_decreases():
    mdn = MDNRNN(latent_dim=3, hidden=16, n_mixtures=4)
    batch, steps = 4, 6
    zs = jax.random.normal(KEY, (batch, steps + 1, 3))
    actions = jax.random.uniform(jax.random.key(2), (batch, steps, 2))
    rewards = jnp.sin(jnp.arange(steps, dtype=jnp.float32))[None].repeat(batch, 0)
    dones = jnp.zeros((batch, steps)).at[:, -1].set(1.0)
    mask = jnp.ones((batch, steps)).at[0, -2:].set(0.0)
    state = initial_state((batch,), 16)
    params = mdn.init(KEY, state, zs[:, 0], actions[:, 0], method=MDNRNN.step)["params"]
    final, hs, out = mdn.apply({"params": params}, state, zs[:, :-1], actions)
    assert final[0].shape == final[1].shape == (batch, 16)
    assert hs.shape == (batch, steps, 16)
    assert np.all(np.asarray(hs[:, 0]) == 0.0)  # h before the first step is the initial state
    assert out.logits.shape == (batch, steps, 4) and out.mu.shape == (batch, steps, 4, 3)
    assert out.reward.shape == out.done_logit.shape == (batch, steps)
    z_next = sample_next_latent(KEY, jax.tree.map(lambda x: x[:, 0], out), temperature=0.5)
    assert z_next.shape == (batch, 3)

    def loss(p):
        _, _, o = mdn.apply({"params": p}, state, zs[:, :-1], actions)
        return mdn_loss(o, zs[:, 1:], rewards, dones, mask)[0]

    before, after = fit(loss, params)
    assert after < before - 0.5


@pytest.mark.slow
def test_controller_bounds_and_weighted_cloning_decreases():
    low, high = (-1.0, 0.0), (1.0, 2.0)
    for hidden in (0, 8):
        ctrl = Controller(low, high, hidden=hidden)
        z, h = jax.random.normal(KEY, (32, 3)) * 10, jax.random.normal(KEY, (32, 5))
        params = ctrl.init(KEY, z, h)["params"]
        mean, log_std = ctrl.apply({"params": params}, z, h)
        assert mean.shape == log_std.shape == (32, 2)
        assert np.all(np.asarray(mean) >= np.array(low)) and np.all(
            np.asarray(mean) <= np.array(high)
        )
    target = jnp.stack([jnp.tanh(z[:, 0]), 1.0 + 0.5 * jnp.tanh(h[:, 1])], -1)
    weights, mask = jnp.ones(32), jnp.ones(32)

    def loss(p):
        m, ls = ctrl.apply({"params": p}, z, h)
        return weighted_bc_loss(m, ls, target, weights, mask)[0]

    before, after = fit(loss, params, steps=100, lr=1e-2)
    assert after < before - 0.5


def test_gaussian_log_prob_matches_closed_form():
    x, mean, log_std = jnp.array([[0.5, -1.0]]), jnp.zeros((1, 2)), jnp.log(jnp.array([[1.0, 2.0]]))
    expected = -0.5 * (0.25 + 0.25) - np.log(2.0) - np.log(2 * np.pi)
    assert float(gaussian_log_prob(x, mean, log_std)[0]) == pytest.approx(expected, rel=1e-6)


def test_discounted_returns_stop_at_episode_end():
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0]])
    dones = jnp.array([[0.0, 1.0, 0.0, 0.0]])
    g = np.asarray(discounted_returns(rewards, dones, 0.5))
    np.testing.assert_allclose(g, [[1.5, 1.0, 1.5, 1.0]])
    w = return_weights(jnp.asarray(g), jnp.ones_like(rewards), 1.0)
    assert float(w[0, 0]) > float(w[0, 1])


@pytest.mark.slow
def test_world_model_init_and_normaliser():
    config = parse_config(
        {"env": "pendulum", "vae": {"latent_dim": 4, "hidden": [8]}, "mdn": {"hidden": 8}}
    )
    spaces = Spaces((3,), "vector", (-2.0,), (2.0,))
    params = Networks.build(config, spaces).init(KEY)
    assert set(params) == {
        "vae", "mdn", "controller", "psi", "psi_ema", "readout", "cumulants", "normaliser",
        "psi_norm",
    }  # fmt: skip
    assert params["cumulants"]["W"].shape == (3, 64)  # phi reads the whole observation
    frames = np.random.default_rng(0).normal(5.0, 3.0, (500, 3)).astype(np.float32)
    stats = observation_stats(frames, "vector")
    z = np.asarray(normalise(jnp.asarray(frames), stats))
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)
    pixels = observation_stats(np.zeros((2, 64, 64, 3), np.uint8), "pixels")
    assert float(normalise(jnp.full((64, 64, 3), 255, jnp.uint8), pixels).max()) == 1.0


def tiny_successor_model(successor: dict, readout: dict | None = None):
    """A small pendulum world model for the successor-feature stages, and its params."""
    config = parse_config({
        "env": "pendulum", "vae": {"latent_dim": 4, "hidden": [8]}, "mdn": {"hidden": 8},
        "successor": {"n_features": 7, "hidden": 16, "depth": 1, **successor},
        "readout": readout or {},
    })  # fmt: skip
    model = Networks.build(config, Spaces((3,), "vector", (-2.0,), (2.0,)))
    return model, model.init(KEY)


def transitions(states, mc_psi: np.ndarray, actions) -> Transitions:
    """Transitions with the given states, outcomes and actions; the rest zero or one."""
    n = states.shape[0]
    return Transitions(
        states=states, next_states=states, phi=jnp.zeros_like(jnp.asarray(mc_psi)),
        dones=jnp.zeros(n), actions=actions, weights=jnp.ones(n),
        observations=jnp.zeros((n, 0)), mc_psi=jnp.asarray(mc_psi),
    )  # fmt: skip


def readout_fit(target: str, steps: int = 300) -> tuple[float, float]:
    """A readout of `target` fitted to actions that only the realised future reveals (the
    states are all alike); its loss on a fresh batch before and after."""
    model, params = tiny_successor_model({"batch_size": 128}, {"hidden": 64, "target": target})
    n = 1024
    mc_psi = np.random.default_rng(0).normal(size=(n, model.psi_dim)).astype(np.float32)
    actions = jnp.asarray(np.clip(mc_psi[:, :1], -1.9, 1.9))
    trans = transitions(jnp.zeros((n, model.state_dim)), mc_psi, actions)
    params = {**params, "psi_norm": psi_statistics(mc_psi)}

    def loss(readout, key):
        return readout_objective(model, {**params, "readout": readout}, trans, key, 0)[0]

    tx = optax.adam(3e-3)
    readout, opt_state = params["readout"], tx.init(params["readout"])
    grad_fn = jax.jit(jax.value_and_grad(loss))
    before = float(loss(readout, jax.random.key(10_000)))
    for i in range(steps):  # fresh rows (and Bellman draws) every step
        _, grads = grad_fn(readout, jax.random.key(i))
        updates, opt_state = tx.update(grads, opt_state)
        readout = optax.apply_updates(readout, updates)
    return before, float(loss(readout, jax.random.key(10_000)))


@pytest.mark.slow
def test_the_monte_carlo_readout_learns_the_action_its_future_reveals():
    mc_before, mc_after = readout_fit("monte_carlo")
    bellman_before, bellman_after = readout_fit("bellman")
    assert mc_after < 0.1 * mc_before  # the realised future names the action
    # A future drawn from the psi-model at s' is the same whatever the action was.
    assert bellman_after > 0.5 * bellman_before


@pytest.mark.slow
def test_history_dropout_hides_the_lstm_state_from_the_psi_loss():
    def psi_loss(dropout: float, h_value: float) -> float:
        model, params = tiny_successor_model({"batch_size": 64, "history_dropout": dropout})
        n = 64
        mc_psi = np.random.default_rng(0).normal(size=(n, model.psi_dim)).astype(np.float32)
        states = jnp.concatenate([jnp.ones((n, 4)), jnp.full((n, 8), h_value)], axis=-1)
        trans = transitions(states, mc_psi, jnp.zeros((n, 1)))
        # Moved off the initialisation, whose conditioning layers ignore the state.
        leaves, treedef = jax.tree.flatten(params["psi"])
        keys = jax.random.split(KEY, len(leaves))
        psi = [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        params = {**params, "psi": jax.tree.unflatten(treedef, psi),
                  "psi_norm": psi_statistics(mc_psi)}  # fmt: skip
        return float(psi_objective(model, params, trans, KEY, 0)[0])

    assert psi_loss(1.0, 0.0) == psi_loss(1.0, 3.0)  # every row's history dropped
    assert psi_loss(0.0, 0.0) != psi_loss(0.0, 3.0)  # the history conditions the loss


@pytest.mark.slow
def test_without_history_the_psi_model_and_readout_read_z_alone():
    def outputs(history: bool, h_value: float) -> tuple[np.ndarray, np.ndarray]:
        model, params = tiny_successor_model({"history": history})
        # Moved off the initialisation, whose conditioning and output layers are zero.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(KEY, len(leaves))
        moved = [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        params = jax.tree.unflatten(treedef, moved)
        state = jnp.concatenate([jnp.ones(4), jnp.full(8, h_value)])
        psi = jnp.ones(model.psi_dim)
        v = model.predict_v(params["psi"], psi, jnp.float32(0.5), state)
        return np.asarray(v), np.asarray(model.read_out(params, state, psi))

    for with_h, without_h in zip(outputs(False, 0.0), outputs(False, 3.0), strict=True):
        np.testing.assert_array_equal(with_h, without_h)
    for with_h, without_h in zip(outputs(True, 0.0), outputs(True, 3.0), strict=True):
        assert not np.allclose(with_h, without_h)
