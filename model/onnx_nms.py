"""NMS inside an exported graph: the `yworld::nms` operator, which is ONNX `NonMaxSuppression` in a file and
the same selection in eager PyTorch.

Why an operator of our own: `torchvision.ops.batched_nms` loops over images in Python (the loop would be
traced for one batch size) and has no translation for the dynamo exporter. ONNX `NonMaxSuppression` does
per-image, per-class NMS over a whole batch in one node: boxes [B, A, 4], scores [B, N, A] ->
selected [K, 3] rows of (image, class, anchor), keeping boxes whose score is above `score_threshold` and
suppressing those whose IoU with a kept box of the same class exceeds `iou_threshold`, at most
`max_per_class` per (image, class). The eager implementation computes the same set with torchvision, so an
export can be checked against PyTorch.

The translation is registered for both exporters: the TorchScript-based one (`register_custom_op_symbolic`)
and the dynamo one (`CUSTOM_TRANSLATION`, passed as `custom_translation_table`).
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

__all__ = ["nms", "CUSTOM_TRANSLATION", "register_torchscript_symbolic"]


@torch.library.custom_op("yworld::nms", mutates_args=())
def nms(boxes: torch.Tensor, scores: torch.Tensor, max_per_class: int, iou_threshold: float,
        score_threshold: float) -> torch.Tensor:
    """boxes [B, A, 4] xyxy, scores [B, N, A] -> selected [K, 3] int64 (image, class, anchor), ordered by
    image, then class, then descending score (ONNX `NonMaxSuppression`, center_point_box = 0)."""
    rows = []
    for b in range(boxes.shape[0]):
        cls, anchor = (scores[b] > score_threshold).nonzero(as_tuple=True)
        cand = scores[b, cls, anchor]
        keep = batched_nms(boxes[b, anchor].float(), cand.float(), cls, iou_threshold)  # by descending score
        cls, anchor = cls[keep], anchor[keep]
        order = torch.sort(cls, stable=True).indices  # class-major, score order kept within a class
        cls, anchor = cls[order], anchor[order]
        rank = torch.arange(len(cls), device=cls.device) - torch.searchsorted(cls, cls)  # rank within its class
        take = rank < max_per_class
        rows.append(torch.stack([torch.full_like(cls[take], b), cls[take], anchor[take]], 1))
    return torch.cat(rows).to(torch.int64) if rows else boxes.new_zeros((0, 3), dtype=torch.int64)


@nms.register_fake
def _(boxes, scores, max_per_class, iou_threshold, score_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _onnxscript_nms(boxes, scores, max_per_class: int, iou_threshold: float, score_threshold: float):
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_per_class]),
                                op.Constant(value_floats=[iou_threshold]),
                                op.Constant(value_floats=[score_threshold]), center_point_box=0)


CUSTOM_TRANSLATION = {torch.ops.yworld.nms.default: _onnxscript_nms}


def _torchscript_nms(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
    from torch.onnx import symbolic_helper

    max_out = symbolic_helper._maybe_get_const(max_per_class, "i")
    iou = symbolic_helper._maybe_get_const(iou_threshold, "f")
    thr = symbolic_helper._maybe_get_const(score_threshold, "f")
    return g.op("NonMaxSuppression", boxes, scores,
                g.op("Constant", value_t=torch.tensor([max_out], dtype=torch.int64)),
                g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float32)),
                g.op("Constant", value_t=torch.tensor([thr], dtype=torch.float32)), center_point_box_i=0)


def register_torchscript_symbolic(opset: int) -> None:
    """Make the TorchScript-based exporter write `yworld::nms` as ONNX NonMaxSuppression (opset >= 11)."""
    torch.onnx.register_custom_op_symbolic("yworld::nms", _torchscript_nms, opset)
