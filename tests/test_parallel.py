"""Data-parallel training: two (forced) CPU devices give one device's parameters up to
float rounding, and each update's batch really is split over them (its compiled program
sums gradients across devices)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import yaml

from service.clients.local import free_port
from tests.conftest import TINY
from training.config import parse_config, with_steps
from training.learning.checkpoint import restore_bundle
from training.learning.loop import read_metrics, train

STEPS = 4  # per stage
# V, M and C only: the successor-feature stages sample their rows the same way.
WORLD_ONLY = {**TINY, "train": {**TINY["train"], "psi_steps": 0, "readout_steps": 0}}
WORLD_ONLY["train"]["value_steps"] = 0
# Run in a subprocess: the device count is fixed when JAX starts.
TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from training.config import ConfigError, parse_config, with_steps
    from training.data.datasets import load_sequences, open_dataset
    from training.models.networks import Networks
    from training.learning.optim import make_optimizer
    from training.learning.parallel import make_mesh, replicated
    from training.learning.stage_inputs import device_data, prepare_stage, spaces_of
    from training.learning.stages import stage_params, stage_update
    from training.learning.loop import train

    config = with_steps(parse_config(json.loads(sys.argv[1])), int(sys.argv[4]))
    data, out = sys.argv[2], sys.argv[3]
    two = train(config, data, f"{out}/two", progress=False, devices=2)

    def all_reduces(n):
        # V's update as train() compiles it on n devices
        dataset = open_dataset(data)
        seqs = load_sequences(dataset, config.data.seq_len)
        model = Networks.build(config, spaces_of(dataset, seqs))
        tx, mesh = make_optimizer(config.train), make_mesh(n)
        with jax.set_mesh(mesh):
            on_mesh = replicated(device_data(seqs), mesh)
            params, inputs = prepare_stage("vae", model, two.params, on_mesh, seqs.episode)
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
        "devices": len(jax.devices()), "refused": refused,
        "all_reduces": [all_reduces(1), all_reduces(2)],
    }))
    """
)


def relative_error(a: dict, b: dict) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (np.max(np.abs(x)) + 1e-6))
        for x, y in pairs
    )


@pytest.fixture(scope="module")
def one_device(umaze_data, tmp_path_factory):
    """The reference: the same config and steps on this process's one device."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    return train(with_steps(parse_config(WORLD_ONLY), STEPS), umaze_data, run_dir, progress=False)


@pytest.mark.slow
def test_two_devices_train_as_one_does(one_device, umaze_data, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    argv = [
        sys.executable,
        "-c",
        TWO_DEVICES,
        json.dumps(WORLD_ONLY),
        str(umaze_data),
        str(tmp_path),
    ]
    argv.append(str(STEPS))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["devices"] == 2
    two = restore_bundle(tmp_path / "two").params
    # The order of float additions, not a different program.
    assert relative_error(one_device.params, two) < 1e-4
    assert report["all_reduces"][0] == 0 and report["all_reduces"][1] > 0
    assert "train.batch_size 7 does not split over 2 devices" in report["refused"]
    assert not (tmp_path / "odd").exists()  # refused before anything was written


@pytest.mark.slow
def test_two_hosts_train_as_one_does(one_device, umaze_data, tmp_path):
    """Two processes joined by jax.distributed (one CPU device each) into one run
    directory: one device's parameters, and one metrics log."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(WORLD_ONLY))
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "train", "--config", str(config)]
    command += ["--data", str(umaze_data), "--steps", str(STEPS), "--quiet"]
    command += ["--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{port}"]
    hosts = [
        subprocess.Popen([*command, "--num-processes", "2", "--process-id", str(i)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in (0, 1)
    ]  # fmt: skip
    for host in hosts:
        _, err = host.communicate(timeout=600)
        assert host.returncode == 0, err[-3000:]
    assert relative_error(one_device.params, restore_bundle(tmp_path / "run").params) < 1e-4
    logged = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert logged == [m["step"] for m in read_metrics(one_device.run_dir)]
