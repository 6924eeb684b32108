"""The service's batch programs: padding, batching and determinism."""

import numpy as np
import pytest

from service.engine import Engine, StepInput
from training.config import ConfigError
from training.learning.checkpoint import restore_bundle
from training.planning.planners import PLANNERS, Knobs, PlanShape
from training.planning.tasks import task_weights


@pytest.fixture(scope="module")
def engine(trained):
    return Engine(restore_bundle(trained.run_dir), batch_sizes=(1, 4))


def decisions(engine, n):
    model, params = engine.model, engine.params
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        goal = rng.uniform(-1, 1, 2).tolist()
        out.append(
            StepInput(
                observation=rng.normal(size=4).astype(np.float32),
                lstm_c=(0.1 * rng.normal(size=model.mdn.hidden)).astype(np.float32),
                lstm_h=(0.1 * rng.normal(size=model.mdn.hidden)).astype(np.float32),
                weights=task_weights(model, params, {"kind": "goal", "goal": goal}),
                seed=100 + i,
                step=i,
                knobs=Knobs(
                    delta_phi_lr=1e-3, kl_coef=1.0 + i, guidance_scale=1.0, adaptation_steps=5
                ),
            )
        )
    return out


@pytest.mark.parametrize("planner", PLANNERS)
@pytest.mark.slow
def test_batched_padded_run_equals_one_by_one(engine, planner):
    shape = PlanShape(planner, 4, 8, 8)
    batch = decisions(engine, 3)
    together = engine.run(shape, batch)  # padded to 4
    assert len(together) == 3
    for item, outcome in zip(batch, together, strict=True):
        (alone,) = engine.run(shape, [item])
        np.testing.assert_allclose(outcome.action, alone.action, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(outcome.lstm_h, alone.lstm_h, rtol=1e-4, atol=1e-5)
        assert outcome.diagnostics.keys() == alone.diagnostics.keys()
        assert (outcome.delta is None) == (planner != "online_adaptation")
    again = engine.run(shape, batch)
    for a, b in zip(together, again, strict=True):
        np.testing.assert_array_equal(a.action, b.action)  # same seed and step, same action


def test_the_step_and_the_seed_change_the_draw(engine):
    shape = PlanShape("random_shooting", 4, 8, 8)
    (base,) = decisions(engine, 1)
    first = engine.run(shape, [base])[0].action
    moved = engine.run(shape, [StepInput(**{**base.__dict__, "step": base.step + 1})])[0].action
    reseeded = engine.run(shape, [StepInput(**{**base.__dict__, "seed": base.seed + 1})])[0].action
    assert not np.array_equal(first, moved) and not np.array_equal(first, reseeded)


def test_oversized_batches_are_refused(engine):
    with pytest.raises(ValueError, match="largest compiled size 4"):
        engine.run(PlanShape("controller", 4, 8, 8), decisions(engine, 5))


def test_warm_up_times_every_compiled_size(engine):
    shape = PlanShape("controller", 4, 8, 8)
    assert engine.warm_up([shape]) > 0.0
    assert {size for (s, size) in engine.call_seconds if s == shape} == {1, 4}
    assert engine.compiled == engine.programs == 2  # what /readyz reports while compiling
    assert all(seconds > 0.0 for seconds in engine.call_seconds.values())


def test_chunks_split_when_calls_cost_their_rows_and_pad_when_calls_cost_alike(trained):
    engine = Engine(restore_bundle(trained.run_dir), batch_sizes=(1, 8, 32))
    shape = PlanShape("online_adaptation", 4, 8, 8)
    assert engine.chunk_sizes(shape, 9) == [32]  # unmeasured: one padded call
    engine.call_seconds = {(shape, size): 0.03 * size + 0.001 for size in (1, 8, 32)}  # a CPU
    assert sorted(engine.chunk_sizes(shape, 9)) == [1, 8]
    assert sorted(engine.chunk_sizes(shape, 31)) == [1] * 7 + [8] * 3
    engine.call_seconds = {(shape, size): 0.005 + 0.0001 * size for size in (1, 8, 32)}  # a GPU
    assert engine.chunk_sizes(shape, 9) == [32]
    assert engine.chunk_sizes(shape, 3) == [8]
    assert engine.chunk_sizes(shape, 1) == [1]


def test_a_split_batch_answers_like_one_by_one(engine):
    shape = PlanShape("online_adaptation", 4, 8, 8)
    batch = decisions(engine, 3)
    engine.call_seconds = {(shape, 1): 0.01, (shape, 4): 0.04}  # cost ∝ rows: 3 = 1 + 1 + 1
    assert engine.chunk_sizes(shape, 3) == [1, 1, 1]
    for item, outcome in zip(batch, engine.run(shape, batch), strict=True):
        np.testing.assert_array_equal(outcome.action, engine.run(shape, [item])[0].action)


def run_batcher(engine, work):
    """Runs `work(batcher)` on a fresh event loop; returns (its result, the batches' stats)."""
    import asyncio

    from service.batcher import Batcher

    stats = []

    async def main():
        batcher = Batcher(engine, max_batch=4, max_wait_ms=200, on_batch=stats.append)
        try:
            return await work(batcher)
        finally:
            await batcher.close()

    return asyncio.run(main()), stats


def test_batcher_gathers_concurrent_decisions_and_keeps_their_answers(engine):
    import asyncio

    shape = PlanShape("random_shooting", 4, 8, 8)
    batch = decisions(engine, 4)
    expected = [engine.run(shape, [d])[0].action for d in batch]

    async def work(batcher):
        return await asyncio.gather(*(batcher.enqueue(shape, d) for d in batch))

    outcomes, stats = run_batcher(engine, work)
    assert [s.size for s in stats] == [4]
    for outcome, action in zip(outcomes, expected, strict=True):
        np.testing.assert_allclose(outcome.action, action, rtol=1e-4, atol=1e-5)


def test_a_lone_decision_waits_only_for_decisions_still_arriving(engine):
    shape = PlanShape("random_shooting", 4, 8, 8)
    (decision,) = decisions(engine, 1)

    async def work(batcher):
        await batcher.enqueue(shape, decision)  # nobody else arriving: no wait
        with batcher.arriving():  # another request is being read, and never comes
            await batcher.enqueue(shape, decision)

    _, stats = run_batcher(engine, work)
    assert [s.size for s in stats] == [1, 1]
    assert stats[0].queue_wait_s[0] < 0.1
    assert stats[1].queue_wait_s[0] >= 0.19  # max_wait_ms


def test_the_engine_lock_is_held_until_a_timed_out_call_has_ended(engine):
    """A request whose deadline passed is cancelled, but its thread runs on: the next
    engine work must wait for the thread, not for the request."""
    import asyncio
    import threading
    import time

    events = []
    release = threading.Event()

    def slow():
        events.append("slow began")
        release.wait(5)
        events.append("slow ended")

    def quick():
        events.append("quick ran")

    async def work(batcher):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.call(slow), 0.05)
        locked_after_timeout = batcher._compute.locked()
        following = asyncio.create_task(batcher.call(quick))
        await asyncio.sleep(0.1)
        waiting = batcher.pending  # the second call waits, and counts against MAX_QUEUE
        threading.Timer(0.1, release.set).start()
        await following
        return locked_after_timeout, waiting

    started = time.perf_counter()
    (locked_after_timeout, waiting), _ = run_batcher(engine, work)
    assert time.perf_counter() - started < 5
    assert locked_after_timeout and waiting == 1
    assert events == ["slow began", "slow ended", "quick ran"]


def test_deployment_planner_defaults_go_over_the_bundle_s_and_bad_ones_name_themselves(trained):
    bundle = restore_bundle(trained.run_dir)
    engine = Engine(bundle, (1,), planning={"planner": "imagination", "n_samples": 8})
    defaults = engine.planning_defaults
    assert (defaults.planner, defaults.n_samples) == ("imagination", 8)
    assert defaults.sample_steps == bundle.config.planning.sample_steps
    assert all(shape.n_samples == 8 for shape in engine.published_shapes((32,)))
    with pytest.raises(ConfigError, match="WORLDPLAN_PLANNING: n_samples: .*greater than 0"):
        Engine(bundle, (1,), planning={"n_samples": 0})
    with pytest.raises(ConfigError, match="WORLDPLAN_PLANNING: planer: Extra inputs"):
        Engine(bundle, (1,), planning={"planer": "imagination"})
