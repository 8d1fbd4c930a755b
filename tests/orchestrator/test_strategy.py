"""How the recipe's global batch is split over workers, and what a DeepSpeed run refuses (no Ray)."""
from __future__ import annotations

import json
import logging

import pytest

from yworld.model.errors import ConfigError
from yworld.orchestrator.spec import load_spec
from yworld.orchestrator.strategy import Accumulation, plan_accumulation


@pytest.mark.parametrize("global_batch, workers, max_micro, plan", [
    (512, 32, 16, Accumulation(1, 16, 32)),  # the recipe: 32 GPUs x 16
    (512, 8, 16, Accumulation(4, 16, 8)),    # a quarter of the GPUs: accumulate 4
    (4, 2, 1, Accumulation(2, 1, 2)),        # the tests' accumulation-2 run
    (512, 16, 12, Accumulation(4, 8, 16)),   # 512/16 = 32 per worker: 3 x 12 does not divide it, 4 x 8 does
])
def test_plan_accumulation_exact_splits(global_batch, workers, max_micro, plan):
    assert plan_accumulation(global_batch, workers, max_micro) == plan
    assert plan.global_batch == global_batch and plan.micro_batch <= max_micro


def test_plan_accumulation_uneven_split_keeps_the_closest_smaller_batch(caplog):
    """3 workers cannot share 512 images equally: the fewest accumulation steps that respect the micro-batch
    limit (11 x 15 x 3 = 495), with a warning, never a micro-batch above the limit or a larger batch."""
    with caplog.at_level(logging.WARNING, logger="yworld.orchestrator.strategy"):
        plan = plan_accumulation(512, 3, 16)
    assert plan == Accumulation(11, 15, 3) and plan.global_batch == 495
    assert "does not split over 3 workers; using 495" in caplog.text
    with pytest.raises(ConfigError, match="smaller than the 8 workers"):
        plan_accumulation(4, 8, 16)


def test_elastic_deepspeed_is_refused_when_the_spec_loads():
    with pytest.raises(ConfigError) as err:
        load_spec("smoke", ["strategy.kind=deepspeed", "scaling.num_workers=[1, 2]"])
    assert "\n" not in str(err.value) and "needs strategy.kind: ddp" in str(err.value)
    load_spec("smoke", ["strategy.kind=deepspeed", "scaling.num_workers=[2, 2]"])  # min = max: not elastic
    load_spec("smoke", ["strategy.kind=ddp", "scaling.num_workers=[1, 2]"])


def test_deepspeed_checkpoint_of_another_worker_count_is_refused_in_one_line(tmp_path, monkeypatch):
    from yworld.orchestrator import strategy as strategy_mod

    (tmp_path / "meta.json").write_text(json.dumps({"world_size": 4}))
    ds = strategy_mod.DeepSpeedStrategy.__new__(strategy_mod.DeepSpeedStrategy)  # no engine: refused before
    monkeypatch.setattr(strategy_mod, "_world_size", lambda: 2)
    with pytest.raises(ConfigError) as err:
        ds.load(str(tmp_path))
    assert "\n" not in str(err.value) and "saved by 4 workers" in str(err.value) and "num_workers: 4" in str(err.value)
