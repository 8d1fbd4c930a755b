"""Parameter counts of every reference variant (docs/reference.md §1.5; issue 2 item 3).

Built on the meta device: shapes only, no memory or init time, so even X takes milliseconds.
"""
from __future__ import annotations

import pytest
import torch

from yworld.model import build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# Ultralytics 8.4.190 `WorldModel(yaml)` parameter counts (the numbers printed in its yolov8*-world*.yaml
# headers). They include the DFL conv's 16 fixed weights, which we keep as a non-persistent buffer.
ULTRALYTICS = {
    "yolo_world_v2_s": 12_759_880, "yolo_world_v2_m": 28_376_158,
    "yolo_world_v2_l": 46_832_050, "yolo_world_v2_x": 72_886_377,
    "yolo_world_v1_s": 13_383_496, "yolo_world_v1_m": 29_065_310,
    "yolo_world_v1_l": 47_553_970, "yolo_world_v1_x": 73_690_217,
}
# issue 2 item 3 / docs/reference.md §1.5, in millions
REFERENCE_M = {
    "yolo_world_v2_s": 12.76, "yolo_world_v2_m": 28.38, "yolo_world_v2_l": 46.83, "yolo_world_v2_x": 72.89,
    "yolo_world_v1_s": 13.38, "yolo_world_v1_m": 29.07, "yolo_world_v1_l": 47.55, "yolo_world_v1_x": 73.69,
}
DFL_WEIGHTS = 16


def count(name: str, **kw) -> int:
    with torch.device("meta"):
        model = build_model(name, **kw)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCE_M))
def test_parameter_count_matches_reference(name):
    n = count(name, text_dim=512)
    assert round(n / 1e6, 2) == REFERENCE_M[name]
    assert n == ULTRALYTICS[name] - DFL_WEIGHTS


@pytest.mark.parametrize("name,yaml", [("yolo_world_v2_s", "yolov8s-worldv2.yaml"),
                                       ("yolo_world_v1_s", "yolov8s-world.yaml")])
def test_parameter_count_equals_live_ultralytics_build(name, yaml):
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics (the reference) is not installed")
    ref = tasks.WorldModel(yaml, verbose=False)
    assert count(name) == sum(p.numel() for p in ref.parameters()) - DFL_WEIGHTS
    # same tensors: our state_dict lacks only the DFL conv weight
    ours = build_model(name).state_dict()
    assert len(ours) == len(ref.state_dict()) - 1


def test_text_dim_changes_only_text_facing_layers():
    # 512 -> 384 changes guide_fc inputs (4 T-CSPs), the cls embedding convs and BN head (3 levels)
    n512, n384 = count("yolo_world_v2_s", text_dim=512), count("yolo_world_v2_s", text_dim=384)
    model = build_model("yolo_world_v2_s", text_dim=512)
    guide_in = sum(m.attn_block.guide_fc.out_features for m in
                   [*model.neck.top_down_layers, *model.neck.bottom_up_layers])
    cls_in = sum(seq[-1].in_channels + 1 for seq in model.head.cls_preds)  # weight rows + bias
    bn = 3 * 2
    assert n512 - n384 == 128 * (guide_in + cls_in + bn)


def test_xl_and_tiny_sizes():
    # XL = X base with widen 1.5 (docs/reference.md §1.1); tiny is our CPU size and must stay small
    assert count("yolo_world_v2_xl") > count("yolo_world_v2_x") * 1.3
    assert count("yolo_world_v2_tiny") < 2_000_000
    assert count("yolo_world_v1_tiny") < 2_000_000
