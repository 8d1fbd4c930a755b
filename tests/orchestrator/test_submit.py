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
    kwargs = submit.build_submission("smoke", ["storage_path=/shared/runs"], tmp_path)
    assert shlex.split(kwargs["entrypoint"]) == ["yworld", "run", "smoke", "--set", "storage_path=/shared/runs"]


def test_submission_fails_fast_on_a_bad_spec_or_a_spec_outside_the_working_dir(repo_root, tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain_l.yaml: train.epocs: unknown key"):
        submit.build_submission(str(repo_root / "jobs" / "pretrain_l.yaml"), ["train.epocs=3"], repo_root)
    outside = tmp_path / "job.yaml"
    outside.write_text((repo_root / "jobs" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=r"must be inside the working dir"):
        submit.build_submission(str(outside), ["storage_path=s3://bucket/runs"], repo_root)


def test_unreachable_cluster_is_one_line(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = argparse.Namespace(command="status", address="http://127.0.0.1:9", job_id="raysubmit_x")
    with pytest.raises(YWorldError, match=r"cannot reach the Ray Jobs API at http://127.0.0.1:9 .*--address") as info:
        submit.main(args)
    assert "\n" not in str(info.value)


def test_a_relative_output_folder_is_refused_for_a_cluster_job(repo_root):
    for job, field in (("smoke", "storage_path"), ("eval_lvis_minival", "output")):
        value = {"storage_path": "runs", "output": "runs/eval"}[field]
        with pytest.raises(ConfigError, match=rf"{field}: '{value}' is a relative path.*s3://") as info:
            submit.build_submission(job, [f"{field}={value}"], repo_root)
        assert "\n" not in str(info.value)
    for ok in ("/shared/runs", "file:///shared/runs", "s3://bucket/runs"):
        submit.build_submission("smoke", [f"storage_path={ok}"], repo_root)


def test_credentials_never_go_on_a_command_line(repo_root):
    from yworld.orchestrator.spec import load_spec

    for override in ("storage.secret=S3CRET", "eval.dataset.storage.secret=S3CRET", "storage.token=S3CRET"):
        with pytest.raises(ConfigError, match=r"credentials are never taken from the command line") as info:
            submit.build_submission("smoke", ["storage_path=/shared/runs", override], repo_root)
        assert "S3CRET" not in str(info.value)
        with pytest.raises(ConfigError, match=r"set them in the environment"):
            load_spec("smoke", [override])  # `yworld run --set ...` too: ps shows it
    load_spec("smoke", ["storage.key=AKIAEXAMPLE", "storage.secret="])  # an access key id is no secret


def test_auth_token_comes_from_rays_own_places(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    assert submit.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.auth_headers() == {"Authorization": "Bearer from-home"}
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert submit.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.auth_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(YWorldError, match=r"RAY_AUTH_TOKEN_PATH=.*missing: cannot read the Ray token"):
        submit.auth_headers()


def test_the_driver_adds_only_what_the_submission_did_not_set(monkeypatch):
    """Ray refuses a driver's runtime env that repeats a field or an env var of the job's (seen live: `yworld
    submit` set RAY_TRAIN_V2_ENABLED, the driver set it again, the job failed in seconds)."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from yworld.orchestrator.ray_setup import JOB_ENV, _beside_submission

    wanted = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}}
    for submitted in ({"working_dir": "/tmp/x", "env_vars": dict(JOB_ENV)}, {"working_dir": "/tmp/x"},
                      {"env_vars": {"HF_HUB_OFFLINE": "0"}}):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": submitted}))
        mine = _beside_submission(wanted)
        merged = _merge_runtime_env(submitted, mine)  # Ray's own rule; None = "Failed to merge"
        assert merged is not None, (submitted, mine)
        assert {**wanted["env_vars"], **submitted.get("env_vars", {})} == merged["env_vars"]
    assert _merge_runtime_env({"env_vars": dict(JOB_ENV)}, wanted) is None  # what used to happen


def test_credentials_in_urls_are_redacted_where_printed():
    from yworld.datasets.storage import StorageOptions, redact_url, storage_error
    from yworld.orchestrator.spec import dump_spec, load_spec

    assert redact_url("http://admin:hunter2@minio:9000/x") == "http://admin:***@minio:9000/x"
    assert redact_url("https://tok123@head:8265") == "https://***@head:8265"
    assert redact_url("s3://bucket/runs") == "s3://bucket/runs"
    job = load_spec("smoke", ["storage.endpoint_url=http://admin:hunter2@minio:9000"])
    assert "hunter2" not in dump_spec(job) and "admin:***@minio:9000" in dump_spec(job)
    options = StorageOptions(endpoint_url="http://admin:hunter2@127.0.0.1:9", secret="hunter3")
    err = storage_error(ConnectionRefusedError("Connection refused"), "s3://b/x", options)
    assert err is not None and "hunter2" not in str(err) and "***" in str(err)
    assert "hunter3" not in repr(options)


def test_ingest_takes_the_secret_from_a_file_never_from_its_command_line(tmp_path):
    import argparse as ap

    from yworld.datasets.ingest import add_storage_arguments, storage_from_args
    from yworld.model.errors import StorageError

    parser = ap.ArgumentParser()
    add_storage_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--secret", "S3CRET"])  # no such flag: ps would show the value
    (tmp_path / "secret").write_text("S3CRET\n")
    options = storage_from_args(parser.parse_args(["--key", "AKIA", "--aws-secret-file", str(tmp_path / "secret")]))
    assert (options.key, options.secret) == ("AKIA", "S3CRET") and "S3CRET" not in repr(options)
    with pytest.raises(StorageError, match=r"--aws-secret-file .*missing: cannot read it"):
        storage_from_args(parser.parse_args(["--aws-secret-file", str(tmp_path / "missing")]))
