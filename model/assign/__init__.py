"""Label assignment for the training objective, chosen by name in the job config.

`build_assigner("tal")` is YOLO-World's own rule (task-aligned, docs/reference.md §3.6, §6.1);
`build_assigner("simota")` is the YOLOX rule (docs/reference.md §6.2). Both take the same inputs and
return the same `Assignment`, so the loss does not depend on which one ran.
"""
from __future__ import annotations

from yworld.model.assign.assignment import Assignment, ChunkedAssigner
from yworld.model.assign.simota import SimOTAAssigner
from yworld.model.assign.tal import TaskAlignedAssigner
from yworld.model.errors import ConfigError

__all__ = ["ASSIGNERS", "Assignment", "SimOTAAssigner", "TaskAlignedAssigner", "build_assigner"]

ASSIGNERS: dict[str, type[ChunkedAssigner]] = {"tal": TaskAlignedAssigner, "simota": SimOTAAssigner}


def build_assigner(name: str, **kwargs) -> ChunkedAssigner:
    """An assigner by name ("tal" | "simota") with its keyword options (e.g. topk, center_radius)."""
    try:
        cls = ASSIGNERS[name.lower()]
    except (KeyError, AttributeError):
        raise ConfigError(f"unknown assigner {name!r} in loss.assigner: use one of {sorted(ASSIGNERS)}") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for assigner {name!r} in loss.assigner_kwargs: {exc}") from None
