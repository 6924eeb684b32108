"""Data-parallel training: two (forced) CPU devices give one device's parameters up to
float rounding, and each update's batch really is split over them (its compiled program
sums gradients across devices)."""

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import TINY

# Run in a subprocess: the device count is fixed when JAX starts.
TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from training.config import ConfigError, parse_config, with_steps
    from training.data import load_sequences, open_dataset
    from training.models.world import WorldModel
    from training.optim import make_optimizer
    from training.parallel import make_mesh, replicated
    from training.train import (
        device_data, prepare_stage, spaces_of, stage_params, stage_update, train,
    )

    config = with_steps(parse_config(json.loads(sys.argv[1])), 4)
    data, out = sys.argv[2], sys.argv[3]
    runs = {n: train(config, data, f"{out}/{n}", progress=False, devices=n) for n in (1, 2)}
    leaves = [[np.asarray(x) for x in jax.tree.leaves(runs[n].params)] for n in (1, 2)]
    pairs = zip(*leaves, strict=True)
    error = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-6)) for a, b in pairs)

    def all_reduces(n):
        # V's update as train() compiles it on n devices
        dataset = open_dataset(data)
        seqs = load_sequences(dataset, config.data.seq_len)
        model = WorldModel.build(config, spaces_of(dataset, seqs))
        tx, mesh = make_optimizer(config.train), make_mesh(n)
        with jax.set_mesh(mesh):
            on_mesh = replicated(device_data(seqs), mesh)
            params, inputs = prepare_stage("vae", model, runs[n].params, on_mesh, seqs.episode)
            state = tx.init(stage_params("vae", config, params))
            args = replicated((params, state, inputs), mesh)
            update = stage_update("vae", model, tx)
            hlo = update.lower(*args, jax.random.key(0), 0).compile().as_text()
        return hlo.count("all-reduce(")

    odd = config.train.model_copy(update={"batch_size": 7})
    try:
        train(config.model_copy(update={"train": odd}), data, f"{out}/odd", devices=2)
        refused = None
    except ConfigError as err:
        refused = str(err)
    print(json.dumps({
        "devices": len(jax.devices()), "error": error, "refused": refused,
        "all_reduces": [all_reduces(1), all_reduces(2)],
    }))
    """
)


def test_two_devices_train_as_one_does(umaze_data, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    argv = [sys.executable, "-c", TWO_DEVICES, json.dumps(TINY), str(umaze_data), str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    assert report["error"] < 1e-4  # the order of float additions, not a different program
    assert report["all_reduces"][0] == 0 and report["all_reduces"][1] > 0
    assert "train.batch_size 7 does not split over 2 devices" in report["refused"]
    assert not (tmp_path / "odd").exists()  # refused before anything was written
