"""The `yworld` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in the module that owns the concept and exposes two functions:
`add_arguments(parser)` and `main(args) -> int`. Only the chosen module is imported, so `yworld --help`
is instant and a broken optional dependency of one command never breaks the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from yworld.model.errors import YWorldError  # torch-free: yworld.model imports its modules on first use

# name -> (module, one-line help). Order is the order shown by `yworld --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("yworld.orchestrator.run", "run a job spec (YAML) here; starts a local Ray without a cluster address"),
    "submit": ("yworld.orchestrator.submit", "submit a job spec to a Ray cluster through the Jobs API and follow its logs"),
    "status": ("yworld.orchestrator.submit", "show the status of a submitted job"),
    "logs": ("yworld.orchestrator.submit", "print the logs of a submitted job"),
    "stop": ("yworld.orchestrator.submit", "stop a submitted job"),
    "synth": ("yworld.datasets.synthetic", "write the synthetic open-vocabulary world in the public formats"),
    "ingest": ("yworld.datasets.ingest", "convert public annotations + images into Parquet shards in storage"),
    "predict": ("yworld.model.predict", "detect objects named by free text in images"),
    "export": ("yworld.model.export", "export a model with its vocabulary folded in to ONNX / OpenVINO, verified"),
    "demo": ("yworld.model.demo", "a Gradio web app: detect with typed classes, export ONNX (offline)"),
    "eval": ("yworld.orchestrator.eval.job", "evaluate a model on LVIS/COCO with distributed inference"),
    "eval-watch": ("yworld.orchestrator.eval.watch", "evaluate every new checkpoint of a training run exactly once"),
    "lvis-eval": ("yworld.orchestrator.eval.metrics_cli", "LVIS AP (standard or Fixed) of a results JSON"),
    "coco-eval": ("yworld.orchestrator.eval.metrics_cli", "COCO AP of a results JSON"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="yworld",
        description="YOLO-World open-vocabulary detection: pretraining, evaluation and serving on Ray.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p) if name not in _MULTI else mod.add_arguments(p, name)
            p.set_defaults(_module=mod)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._module.main(args) or 0)
    except YWorldError as e:
        if args.debug:
            raise
        print(f"yworld: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yworld: interrupted", file=sys.stderr)
        return 130


# Modules that serve several subcommands get the subcommand name in add_arguments(parser, name).
_MULTI = {"submit", "status", "logs", "stop", "lvis-eval", "coco-eval"}

if __name__ == "__main__":
    sys.exit(main())
