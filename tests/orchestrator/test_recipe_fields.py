"""Every recipe number of the loss is a spec field with its default visible, and a changed value reaches the
code that uses it."""
from __future__ import annotations

import inspect

from yworld.model.assign import SimOTAAssigner, TaskAlignedAssigner
from yworld.model.loss import YOLOWorldLoss
from yworld.orchestrator.spec import load_spec, to_dict


def _defaults(cls: type, names) -> dict:
    params = inspect.signature(cls).parameters
    return {n: params[n].default for n in names}


def test_assigner_numbers_default_to_the_official_values():
    loss = to_dict(load_spec("smoke").loss)
    # ultralytics v8DetectionLoss / mmyolo BatchTaskAlignedAssigner; YOLOX get_assignments (radius 2.5, top-10 IoUs)
    assert loss["tal"] == {"topk": 10, "alpha": 0.5, "beta": 6.0}
    assert loss["simota"] == {"center_radius": 2.5, "candidate_topk": 10, "iou_weight": 3.0, "cls_weight": 1.0,
                              "require_in_box": True}
    assert loss["tal"] == _defaults(TaskAlignedAssigner, loss["tal"])  # the spec and the code agree
    assert loss["simota"] == _defaults(SimOTAAssigner, loss["simota"])


def test_changed_assigner_numbers_reach_the_assigner():
    job = load_spec("smoke", ["loss.tal.topk=13", "loss.tal.alpha=1.0", "loss.tal.beta=4"])
    tal = YOLOWorldLoss.from_config(job.loss).assigner  # what the train loop builds
    assert isinstance(tal, TaskAlignedAssigner) and (tal.topk, tal.alpha, tal.beta) == (13, 1.0, 4.0)
    job = load_spec("smoke", ["loss.assigner=simota", "loss.simota.center_radius=1.5",
                              "loss.simota.candidate_topk=5"])
    simota = YOLOWorldLoss.from_config(job.loss).assigner
    assert isinstance(simota, SimOTAAssigner) and (simota.center_radius, simota.candidate_topk) == (1.5, 5)
