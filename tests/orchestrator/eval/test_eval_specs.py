"""The shipped evaluation job specs load through the spec validator, bad values fail with one line, and
the Kubernetes CronJob / KubeRay RayJob run what they claim (checked with Ray's own CLI and config code)."""
from __future__ import annotations

import json

import pytest
import yaml

from yworld.model.errors import ConfigError
from yworld.orchestrator.spec import load_spec


def test_shipped_eval_specs_load():
    lvis = load_spec("eval_lvis_minival")
    assert lvis.kind == "eval" and lvis.dataset.format == "lvis" and set(lvis.protocols) == {"fixed", "standard"}
    assert lvis.inference.max_dets_per_image == 1000 and lvis.inference.score_threshold == 0.001
    coco = load_spec("eval_coco")
    assert coco.kind == "eval" and coco.protocols == ["coco"]
    watch = load_spec("eval_watch")
    assert watch.kind == "eval-watch" and watch.run == "pretrain_l" and watch.text is None


@pytest.mark.parametrize("override, message", [
    ("protocols=[coco]", "do not apply to lvis"),
    ("inference.img_size=100", "multiple of 32"),
    ("inference.nms_iou=2", "nms_iou"),
    ("dataset.format=voc", "dataset.format"),
    ("inference.batchsize=3", "unknown key"),
])
def test_bad_eval_spec_values(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_spec("eval_lvis_minival", [override])
    assert "\n" not in str(err.value) and "eval_lvis_minival.yaml" in str(err.value)


def test_watch_spec_needs_a_run():
    with pytest.raises(ConfigError, match="run"):
        load_spec("eval_watch", ["run="])


def test_cronjob_submits_eval_watch_once(repo_root):
    from ray.dashboard.modules.job.cli import submit

    cron = yaml.safe_load((repo_root / "jobs" / "k8s" / "eval-cronjob.yaml").read_text())
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"]
    params = submit.make_context("submit", command[3:]).params  # Ray's own CLI parses the arguments
    assert params["entrypoint"] == ("yworld", "eval-watch", "eval_watch", "--once")
    assert params["address"].startswith("http://") and json.loads(params["runtime_env_json"])["env_vars"]
    load_spec(params["entrypoint"][2])  # the packaged spec it names exists and is valid


def test_eval_rayjob_manifest(repo_root):
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = yaml.safe_load((repo_root / "jobs" / "k8s" / "eval-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:3] == ["yworld", "eval", "eval_lvis_minival"]
    spec = load_spec(entry[2], [entry[entry.index("--set") + 1]])
    derived = _derive_autoscaling_config_from_ray_cr({"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]})
    gpus = sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in derived["available_node_types"].values())
    assert spec.inference.use_gpu and gpus >= spec.inference.num_actors  # one GPU per actor fits
