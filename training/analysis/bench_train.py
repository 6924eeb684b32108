"""`worldplan bench-train`: steps per second of each training mode's compiled update.

For each variant of a config (staged's V, M and C stages; C by CMA-ES in the dream, one
generation a step; end_to_end with full BPTT, with
TBPTT 8, with the auxiliary losses, with the imagination loss; each phase of
alternating; meta-learned weights), the stage is set up as `train` sets it up, on
`--devices` devices, its update compiled by a first call, and then `steps` updates are
timed, `repeats` times; the median is reported. Writes bench_train.md and
bench_train.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from training.analysis.evaluate import markdown_table
from training.analysis.provenance import provenance, write_result
from training.config import Config, parse_config
from training.data.datasets import files_digest
from training.errors import UsageError
from training.learning.joint import PHASES, phase_start
from training.learning.loop import initial_opt_states, new_run
from training.learning.parallel import check_batches, make_mesh, replicated
from training.learning.stage_inputs import prepare_stage
from training.learning.stages import stage_bounds, stage_update

# name -> (changes to the config, the stages or alternating phases timed)
VARIANTS = {
    "staged": ({"train": {"mode": "staged"}}, ("vae", "mdn", "controller")),
    # a step of C's stage is a CMA-ES generation: steps/s is generations/s
    "staged, C by cmaes_dream": (
        {"train": {"mode": "staged", "controller": "cmaes_dream"}},
        ("controller",),
    ),
    "end_to_end": ({"train": {"mode": "end_to_end"}}, ("joint",)),
    "end_to_end, tbptt 8": ({"train": {"mode": "end_to_end", "tbptt": 8}}, ("joint",)),
    "end_to_end, aux": (
        {"train": {"mode": "end_to_end"}, "joint": {"aux_losses": True}},
        ("joint",),
    ),
    "end_to_end, imagination": (
        {"train": {"mode": "end_to_end"}, "joint": {"policy_loss": "imagination"}},
        ("joint",),
    ),
    "alternating": ({"train": {"mode": "alternating"}}, PHASES),
    "end_to_end, meta λ": (
        {"train": {"mode": "end_to_end"}, "joint": {"meta_learning": True, "schedule": False}},
        ("joint",),
    ),
}


def parse_modes(text: str) -> list[str]:
    """A comma list of variant names, some of which hold a comma themselves ("end_to_end,
    tbptt 8"): at each place, the longest run of pieces that names a variant."""
    pieces, modes, i = [p.strip() for p in text.split(",")], [], 0
    while i < len(pieces):
        ends = [j for j in range(len(pieces), i, -1) if ", ".join(pieces[i:j]) in VARIANTS]
        if not ends:
            raise UsageError(f"unknown modes ['{pieces[i]}']; known: {'; '.join(VARIANTS)}")
        modes.append(", ".join(pieces[i : ends[0]]))
        i = ends[0]
    return modes


def variant(config: Config, changes: dict) -> Config:
    raw = config.model_dump(mode="json")
    for section, values in changes.items():
        raw[section] = {**raw[section], **values}
    return parse_config(raw, "bench-train")


def time_updates(update, params, opt_state, inputs, first_step: int, steps: int, repeats: int):
    """Median steps per second of `steps` updates from `first_step`, after one compiling call."""
    key = jax.random.key(0)
    params, opt_state, _ = update(params, opt_state, inputs, key, first_step)
    jax.block_until_ready(params)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(steps):
            params, opt_state, _ = update(params, opt_state, inputs, key, first_step + i)
        jax.block_until_ready(params)
        rates.append(steps / (time.perf_counter() - started))
    return float(np.median(rates))


def bench_variant(config: Config, data_path, parts, mesh, steps: int, repeats: int) -> dict:
    seqs, data, _, model, params, tx = new_run(config, data_path, mesh)
    opt_states = initial_opt_states(config, params, tx)
    rates = {}
    with jax.set_mesh(mesh):
        for part in parts:
            stage = part if config.train.mode == "staged" else "joint"
            stage_params, inputs = prepare_stage(stage, model, params, data, seqs.episode)
            args = replicated((stage_params, opt_states[stage], inputs), mesh)
            first = stage_bounds(config)[stage][0]
            if config.train.mode == "alternating":
                first += phase_start(config, part)
            update = stage_update(stage, model, tx)
            rates[part] = time_updates(update, *args, first, steps, repeats)
    return rates


def bench_train(
    config: Config,
    data_path: str | Path,
    out: str | Path,
    steps: int = 20,
    repeats: int = 3,
    devices: int | None = None,
    modes: list[str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every variant, or those named in `modes`."""
    unknown = sorted(set(modes or []) - set(VARIANTS))
    if unknown:
        raise UsageError(f"unknown modes {unknown}; known: {', '.join(VARIANTS)}")
    mesh = make_mesh(devices)
    check_batches(config, mesh.size)
    chosen = {k: v for k, v in VARIANTS.items() if modes is None or k in modes}
    rows = []
    for name, (changes, parts) in tqdm(chosen.items(), disable=not progress, desc="modes"):
        rates = bench_variant(variant(config, changes), data_path, parts, mesh, steps, repeats)
        rows += [{"mode": name, "part": p, "steps_per_second": r} for p, r in rates.items()]
    header = ["mode", "stage or phase", "steps/s"]
    body = [[r["mode"], r["part"], f"{r['steps_per_second']:.1f}"] for r in rows]
    title = (
        f"{config.env}, batch {config.train.batch_size} windows of {config.data.seq_len} steps, "
        f"{mesh.size} × {mesh.devices.flat[0].device_kind}, median of {repeats} × {steps} updates"
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.md").write_text(f"{title}\n\n{markdown_table(header, body)}\n")
    origin = provenance(
        config=config.model_dump(mode="json"), data=str(data_path),
        data_sha256=files_digest(data_path), devices=mesh.size, steps=steps, repeats=repeats,
        modes=list(chosen),
    )  # fmt: skip
    record = {"title": title, "devices": mesh.size, "rows": rows}
    write_result(out / "bench_train.json", record, origin)
    return rows
