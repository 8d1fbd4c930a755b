"""`yworld submit`: the Jobs API submission built from a spec (validated locally first), and its errors."""
from __future__ import annotations

import argparse
import shlex

import pytest

from yworld.model.errors import ConfigError, YWorldError
from yworld.orchestrator import submit


def test_submission_runs_the_spec_from_the_working_dir(repo_root, tmp_path):
    kwargs = submit.build_submission(str(repo_root / "jobs" / "pretrain_l.yaml"), ["train.epochs=3"], repo_root)
    assert shlex.split(kwargs["entrypoint"]) == ["yworld", "run", "jobs/pretrain_l.yaml", "--set", "train.epochs=3"]
    env = kwargs["runtime_env"]
    assert env["working_dir"] == str(repo_root) and ".venv" in env["excludes"] and "runs" in env["excludes"]
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    # a packaged name stays a name: the cluster's installed yworld resolves it
    assert shlex.split(submit.build_submission("smoke", [], tmp_path)["entrypoint"]) == ["yworld", "run", "smoke"]


def test_submission_fails_fast_on_a_bad_spec_or_a_spec_outside_the_working_dir(repo_root, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain_l.yaml: train.epocs: unknown key"):
        submit.build_submission(str(repo_root / "jobs" / "pretrain_l.yaml"), ["train.epocs=3"], repo_root)
    outside = tmp_path / "job.yaml"
    outside.write_text((repo_root / "jobs" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=r"must be inside the working dir"):
        submit.build_submission(str(outside), [], repo_root)


def test_unreachable_cluster_is_one_line(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = argparse.Namespace(command="status", address="http://127.0.0.1:9", job_id="raysubmit_x")
    with pytest.raises(YWorldError, match=r"cannot reach the Ray Jobs API at http://127.0.0.1:9 .*--address") as info:
        submit.main(args)
    assert "\n" not in str(info.value)
