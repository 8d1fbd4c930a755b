"""Packaging: the repo root on sys.path never shadows HuggingFace `datasets`, and a built wheel works on its own.

Why: Ray's `working_dir` puts the repo root first on every worker's sys.path (docs/architecture.md
"Packaging"), and users install the wheel, not the editable checkout.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

PACKAGE_DIRS = {"model": "yworld/model", "datasets": "yworld/datasets", "orchestrator": "yworld/orchestrator",
                "jobs": "yworld/jobs"}


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)


def test_repo_root_first_does_not_shadow_hf_datasets(repo_root):
    pytest.importorskip("datasets", reason="HuggingFace datasets is not installed")
    code = (
        f"import sys; sys.path.insert(0, {str(repo_root)!r}); "
        "import datasets, yworld.model; "
        "print(datasets.__file__); print(hasattr(datasets, 'load_dataset')); print(yworld.model.__file__)"
    )
    out = _run([sys.executable, "-c", code], cwd=repo_root)  # cwd = repo root, like a Ray worker
    assert out.returncode == 0, out.stderr
    hf_file, has_load_dataset, model_file = out.stdout.split()
    assert "site-packages" in hf_file and has_load_dataset == "True", hf_file
    assert Path(model_file).resolve().is_relative_to(repo_root / "model")


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory, repo_root):
    """Build a wheel from a copy of the source (an in-tree build would write build/ into the shared checkout)
    and install it with --target into a folder of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo_root / name, src / name)
    for name in PACKAGE_DIRS:
        shutil.copytree(repo_root / name, src / name, ignore=skip)
    # A probe job spec proves package-data ships jobs/*.yaml even before any job exists in the repo.
    (src / "jobs" / "zz_packaging_probe.yaml").write_text("name: probe\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    out = _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)])
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp / "dist").glob("yworld-*.whl")
    out = _run(pip + ["install", "--no-deps", "--target", str(tmp / "site"), str(wheel)])
    assert out.returncode == 0, out.stderr
    return wheel, tmp / "site", src


def test_wheel_layout(built_wheel):
    wheel, _, src = built_wheel
    names = set(zipfile.ZipFile(wheel).namelist())
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"yworld", wheel.name.split("-py")[0] + ".dist-info"}, top_level
    assert not {"model", "datasets", "orchestrator", "jobs"} & top_level
    assert "yworld/datasets/__init__.py" not in names  # namespace package: must never shadow HF datasets
    assert "yworld/__init__.py" not in names
    # Every source module and job spec of the repo is in the wheel (a sub-package missing from
    # pyproject's `packages` list would silently drop out).
    for folder, target in PACKAGE_DIRS.items():
        for path in (src / folder).rglob("*"):
            if path.suffix in (".py", ".yaml"):
                assert f"{target}/{path.relative_to(src / folder).as_posix()}" in names, path
    assert "yworld/jobs/zz_packaging_probe.yaml" in names


def test_installed_wheel_imports_without_the_checkout(built_wheel, repo_root, tmp_path):
    _, site, src = built_wheel
    dataset_modules = sorted(p.stem for p in (src / "datasets").glob("*.py"))
    dataset_module = "records" if "records" in dataset_modules else (dataset_modules or [None])[0]
    # -S: no site processing, so the editable install's .pth finder never loads; the venv's site-packages is
    # appended by hand for the dependencies (torch, ...), after the wheel's folder.
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(site)!r})",
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})",
        "import yworld.model, yworld.orchestrator.cli, yworld.model.text",
        f"if {dataset_module!r} != 'None': __import__('yworld.datasets.' + {dataset_module!r})",
        "from importlib.resources import files",
        "print(yworld.model.__file__)",
        "print(yworld.orchestrator.cli.__file__)",
        "print(sorted(p.name for p in files('yworld.jobs').iterdir() if p.name.endswith('.yaml')))",
        "assert not any('__editable__' in type(f).__module__ for f in sys.meta_path)",
    ])
    out = _run([sys.executable, "-S", "-c", code], cwd=tmp_path)  # cwd outside the checkout
    assert out.returncode == 0, out.stderr
    model_file, cli_file, jobs = out.stdout.strip().splitlines()
    for f in (model_file, cli_file):
        assert Path(f).resolve().is_relative_to(site.resolve()), f
    assert "zz_packaging_probe.yaml" in jobs


def test_console_script_help(built_wheel, tmp_path):
    _, site, _ = built_wheel
    script = site / "bin" / "yworld"
    assert script.exists()
    out = _run([sys.executable, str(script), "--help"], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "usage: yworld" in out.stdout
    # The editable install's console script too (the one `pip install -e .` puts on PATH).
    venv_script = Path(sys.executable).parent / "yworld"
    if venv_script.exists():
        out = _run([str(venv_script), "--help"], cwd=tmp_path)
        assert out.returncode == 0 and "usage: yworld" in out.stdout, out.stderr
