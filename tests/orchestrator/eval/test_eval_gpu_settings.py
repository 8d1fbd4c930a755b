"""Evaluation actors on GPU: no silent CPU fallback, 16-bit inference with boxes decoded in fp32, and the
actors' own GPU pool (no Ray needed: the actor class and the spec are checked directly)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from yworld.model import build_model
from yworld.model.errors import ConfigError
from yworld.model.weights import save_weights
from yworld.orchestrator.eval.job import Detector
from yworld.orchestrator.eval.spec import InferenceSpec
from yworld.orchestrator.spec import load_spec


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_weights(build_model("yolo_world_v2_tiny", text_dim=384),
                        str(tmp_path_factory.mktemp("w") / "model.safetensors"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")
def test_an_actor_asked_for_a_gpu_without_cuda_fails_in_one_line(weights):
    text = np.random.default_rng(0).normal(size=(3, 384)).astype(np.float32)
    with pytest.raises(ConfigError) as err:
        Detector(weights, text, np.arange(3), InferenceSpec(use_gpu=True))
    assert "\n" not in str(err.value) and "no CUDA device" in str(err.value) and "use_gpu: false" in str(err.value)
    cpu = Detector(weights, text, np.arange(3), InferenceSpec(use_gpu=False, precision="fp16"))
    assert cpu.device.type == "cpu" and cpu.autocast_dtype is None  # a CPU actor runs fp32 whatever the spec


def test_boxes_are_decoded_in_fp32_under_16_bit_autocast():
    model = build_model("yolo_world_v2_tiny", text_dim=384).eval()
    images = torch.rand(1, 3, 128, 128)
    text = torch.nn.functional.normalize(torch.randn(1, 5, 384), dim=-1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model.train()(images, text)  # the head's train-mode outputs carry the logits too
        model.eval()
        boxes, _ = model(images, text)
    assert boxes.dtype == torch.float32 and outputs.boxes.dtype == torch.float32
    # the decode of the (bf16) DFL logits equals an fp32 decode of the same logits: no 16-bit matmul inside
    expected = model.head.decode(outputs.box_dist.float(), outputs.anchors, outputs.strides)
    torch.testing.assert_close(outputs.boxes, expected, rtol=0, atol=1e-4)


def test_evaluation_runs_on_its_own_gpu_pool(repo_root):
    import yaml

    watch = load_spec("eval_watch")
    cluster = yaml.safe_load((repo_root / "jobs" / "cluster" / "aws-4x8gpu.yaml").read_text())
    eval_types = [t for t in cluster["available_node_types"].values() if t.get("resources", {}).get("GPU")
                  and t["resources"]["GPU"] < 8]
    assert watch.inference.use_gpu and watch.inference.accelerator_type == "A10G"
    assert watch.inference.precision == "fp16"
    (pool,) = eval_types
    assert pool["node_config"]["InstanceType"].startswith("g5.")  # A10G: never the training nodes' A100s
    assert pool["max_workers"] >= watch.inference.num_actors // pool["resources"]["GPU"]
