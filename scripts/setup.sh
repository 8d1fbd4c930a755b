#!/usr/bin/env bash
# Idempotent environment set-up: creates .venv with everything the project and its tests need.
# torch/torchvision go first at exact versions (a local wheel on our dev machines; any build works on a
# cluster), then DeepSpeed without build isolation (its sdist imports torch at build time; with isolation
# pip would fetch a second, newest torch), then the project itself in editable mode with the dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${YWORLD_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.yworld-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
# The demo's browser test drives Debian's Chromium (Playwright with executable_path; no browser download).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup.sh: /usr/bin/chromium is missing (the demo's browser test needs it): apt-get install chromium" >&2
  fi
fi
if [ -f "$STAMP" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"
$PIP --upgrade pip setuptools wheel
$VENV/bin/python -c "import torch, torchvision" 2>/dev/null || \
  $PIP ${YWORLD_TORCH_INDEX:+--index-url "$YWORLD_TORCH_INDEX"} \
    "torch==${YWORLD_TORCH:-2.14.1}" "torchvision==${YWORLD_TORCHVISION:-0.29.1}"  # e.g. a cu126 index for V100
$VENV/bin/python -c "import deepspeed" 2>/dev/null || $PIP --no-build-isolation "deepspeed>=0.16"
$PIP -e ".[dev]"
rm -f "$VENV"/.yworld-setup-*
touch "$STAMP"
