"""A training run's evaluation history: one table (Parquet + CSV) and a Markdown report with PNG plots.

The table is rebuilt from the per-checkpoint `done.json` files (the single source of truth, each written
once), so any number of watchers can regenerate it: they all write the same content, and a watcher that
saw fewer checkpoints is corrected by the next rebuild (every poll checks).

Files under the evaluation folder (`{run}/eval/{name}/`):
    results.parquet, results.csv   checkpoint, step, epoch, protocol, protocol_label, split, every metric
    report.md                      latest numbers per protocol and split, the history table, the plots
    ap_vs_step.png                 AP (and AP50) vs step, one line per protocol and split
    ap_frequency_vs_step.png       APr / APc / APf vs step, one panel per protocol
"""
from __future__ import annotations

import io
import json
import logging
import math
import time

from yworld.datasets.storage import StorageOptions, filesystem, join, write_bytes_atomic
from yworld.orchestrator.eval.lease import DONE

log = logging.getLogger(__name__)

KEY_COLUMNS = ["checkpoint", "step", "epoch", "protocol", "protocol_label", "split"]
PLOTS = ("ap_vs_step.png", "ap_frequency_vs_step.png")


def collect_rows(eval_url: str, storage: StorageOptions) -> list[dict]:
    """Every finished checkpoint's metric rows, sorted by step, protocol, split."""
    fs, root = filesystem(eval_url, storage)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    rows = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        path = f"{entry['name'].rstrip('/')}/{DONE}"
        try:
            done = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            continue
        for r in done.get("rows", []):
            rows.append({"checkpoint": done["checkpoint"], "step": int(done["step"]), "epoch": int(done["epoch"]),
                         **r})
    split_rank = {"all": 0, "seen": 1, "held-out": 2}
    rows.sort(key=lambda r: (r["step"], r["checkpoint"], r["protocol"], split_rank.get(r["split"], 3), r["split"]))
    return rows


def write_table(rows: list[dict], eval_url: str, storage: StorageOptions) -> None:
    import pandas as pd

    fs, root = filesystem(eval_url, storage)
    metric_cols = list(dict.fromkeys(k for r in rows for k in r if k not in KEY_COLUMNS))
    frame = pd.DataFrame(rows, columns=KEY_COLUMNS + metric_cols)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes_atomic(fs, f"{root}/results.parquet", buf.getvalue())
    write_bytes_atomic(fs, f"{root}/results.csv", frame.to_csv(index=False).encode())


def _value(v) -> float:
    """-1 (the APIs' "no ground truth") and missing values are gaps in tables and plots."""
    return math.nan if v is None or v == -1 or (isinstance(v, float) and math.isnan(v)) else float(v)


def _series(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        out.setdefault((r["protocol_label"], r["split"]), []).append(r)
    return out


def plot_ap(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    colors = {"all": "tab:blue", "seen": "tab:green", "held-out": "tab:red"}
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for (_, split), series in _series(rows).items():
        protocol = series[0]["protocol"]
        ax.plot([r["step"] for r in series], [_value(r.get("AP")) for r in series], marker="o",
                color=colors.get(split), linestyle=styles[protocols.index(protocol) % len(styles)],
                label=f"{protocol} · {split}")
    ax.set_xlabel("training step")
    ax.set_ylabel("AP (IoU 0.50:0.95)")
    ax.set_title("AP vs step (protocols: line style; category splits: colour)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _png(fig)


def plot_frequency_groups(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lvis = [r for r in rows if r["split"] == "all" and "APr" in r]
    labels = list(dict.fromkeys(r["protocol_label"] for r in lvis)) or ["(no LVIS protocol evaluated)"]
    fig, axes = plt.subplots(1, len(labels), figsize=(5.2 * len(labels), 4.0), dpi=110, squeeze=False)
    for ax, label in zip(axes[0], labels):
        series = [r for r in lvis if r["protocol_label"] == label]
        steps = [r["step"] for r in series]
        for key, name in (("APr", "rare"), ("APc", "common"), ("APf", "frequent")):
            ax.plot(steps, [_value(r.get(key)) for r in series], marker="o", label=f"{key} ({name})")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel("AP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("APr / APc / APf vs step", fontsize=10)
    return _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "", f"Updated {time.strftime('%Y-%m-%d %H:%M:%S')}; "
             f"{len({r['checkpoint'] for r in rows})} checkpoint(s) evaluated. "
             "n/a: no ground truth for that number (the official APIs' -1).", ""]
    for (label, split), series in _series(rows).items():
        names = [k for k in series[-1] if k not in KEY_COLUMNS]
        lines += [f"## {label} — categories: {split}", "",
                  "| checkpoint | step | epoch | " + " | ".join(names) + " |",
                  "|---|---:|---:|" + "---:|" * len(names)]
        for r in series:
            cells = ["n/a" if math.isnan(_value(r.get(n))) else f"{_value(r[n]):.4f}" for n in names]
            lines.append(f"| {r['checkpoint']} | {r['step']} | {r['epoch']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Plots", "", f"![AP vs step]({PLOTS[0]})", "", f"![APr/APc/APf vs step]({PLOTS[1]})", ""]
    return "\n".join(lines)


def regenerate(eval_url: str, storage: StorageOptions, title: str) -> list[dict]:
    """Rebuild table, plots and report from the finished checkpoints; returns the rows."""
    rows = collect_rows(eval_url, storage)
    if not rows:
        return rows
    fs, root = filesystem(eval_url, storage)
    write_table(rows, eval_url, storage)
    write_bytes_atomic(fs, f"{root}/{PLOTS[0]}", plot_ap(rows))
    write_bytes_atomic(fs, f"{root}/{PLOTS[1]}", plot_frequency_groups(rows))
    write_bytes_atomic(fs, f"{root}/report.md", markdown(rows, title).encode())
    log.info("report: %s (%d rows)", join(eval_url, "report.md"), len(rows))
    return rows


def table_checkpoints(eval_url: str, storage: StorageOptions) -> set[str]:
    """Checkpoints in the current results table (to detect a stale table)."""
    import pyarrow.parquet as pq

    fs, root = filesystem(eval_url, storage)
    try:
        with fs.open(f"{root}/results.parquet", "rb") as f:
            return set(pq.read_table(f, columns=["checkpoint"]).column("checkpoint").to_pylist())
    except FileNotFoundError:
        return set()
