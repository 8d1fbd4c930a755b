"""Structure: no import cycle among yworld's modules, and a CLI whose fast commands import neither torch nor Ray."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

from yworld.orchestrator import run
from yworld.orchestrator.cli import main as cli
from yworld.orchestrator.spec import load_spec, to_dict

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {"orchestrator": "yworld.orchestrator", "datasets": "yworld.datasets", "model": "yworld.model"}


def _module_files() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """yworld modules that module `name` imports anywhere: at module level and inside functions (an import
    moved into a function to dodge a cycle is still an edge of the cycle); `if TYPE_CHECKING:` blocks never run."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[:len(parts) - node.level + 1], *filter(None, [base])])
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{base}.{alias.name}" in modules:
                    out.add(f"{base}.{alias.name}")
                elif base in modules:
                    out.add(base)
    out.discard(name)
    return out


def _runtime_nodes(node: ast.AST):
    yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            yield from (n for c in child.orelse for n in _runtime_nodes(c))
            continue
        yield from _runtime_nodes(child)


def test_no_import_cycle():
    files = _module_files()
    graph = {name: _imports(name, path, set(files)) for name, path in files.items()}
    assert graph["yworld.orchestrator.run"] >= {"yworld.orchestrator.eval.job", "yworld.orchestrator.ray_setup"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                dfs(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_cycle_scan_sees_a_cycle(tmp_path, monkeypatch):
    """The scan above can fail: two modules importing each other at top level are reported."""
    (tmp_path / "a.py").write_text("from yworld.orchestrator import b\nif TYPE_CHECKING:\n    import yworld.x\n")
    (tmp_path / "b.py").write_text("import os\n\ndef f():\n    from . import a\n")  # hidden in a function
    modules = {"yworld.orchestrator.a", "yworld.orchestrator.b", "yworld.x"}
    assert _imports("yworld.orchestrator.a", tmp_path / "a.py", modules) == {"yworld.orchestrator.b"}
    assert _imports("yworld.orchestrator.b", tmp_path / "b.py", modules) == {"yworld.orchestrator.a"}


# Runs CLI commands in one fresh interpreter and reports, after each, whether torch / ray were imported.
_PROBE = """
import contextlib, io, json, sys
from yworld.orchestrator.cli import main
seen = []
for argv in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    seen.append({"argv": argv, "rc": rc, "out": out.getvalue(), "torch": "torch" in sys.modules,
                 "ray": "ray" in sys.modules})
print(json.dumps(seen))
"""


def _probe(*commands: list[str]) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fast_commands_import_neither_torch_nor_ray():
    fixture = REPO / "tests" / "fixtures" / "eval"
    help_, lvis, coco, dry_run = _probe(
        ["--help"],
        ["lvis-eval", str(fixture / "lvis_val.json"), str(fixture / "results.json"), "--json"],
        ["coco-eval", str(fixture / "coco_val.json"), str(fixture / "results.json"), "--json"],
        ["run", "eval_lvis_minival", "--dry-run"],
    )
    assert help_["rc"] == 0 and "lvis-eval" in help_["out"]
    assert lvis["rc"] == 0 and json.loads(lvis["out"])["protocol"] == "lvis-standard"
    assert coco["rc"] == 0 and json.loads(coco["out"])["protocol"] == "coco"
    assert dry_run["rc"] == 0 and yaml.safe_load(dry_run["out"]) == to_dict(load_spec("eval_lvis_minival"))
    for step in (help_, lvis, coco, dry_run):
        assert not step["torch"] and not step["ray"], step["argv"]


def test_run_dry_run_prints_the_resolved_spec_and_starts_nothing(monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("a dry run started Ray")

    monkeypatch.setattr(run, "init_ray", no_ray)
    monkeypatch.setattr(run, "run_job", no_ray)
    assert cli(["run", "smoke", "--dry-run", "--set", "train.epochs=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_spec("smoke", ["train.epochs=2"]))  # every default filled in
    assert printed["train"]["epochs"] == 2
    assert {"optim", "loss", "checkpoint", "scaling", "strategy"} <= set(printed)
