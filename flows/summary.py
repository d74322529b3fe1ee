"""What a pipeline run reports: the stage table, round 1 vs round 2, kept fractions, where things are.

The flow returns a plain JSON-able `summary` dict; this module renders it twice, as the Prefect
markdown artifact of the run and as the text `capfilt run` prints. Round metrics are read from the
evaluate stage's metrics file (`promote.metrics_file`: `round1`, `round2`, `gain`, `filter`
objects) when it exists; kept fractions are every stage metric whose name mentions `kept`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.tracking import numeric_leaves


def round_table(metrics_file: Path) -> list[dict[str, Any]]:
    """Rows {metric, round1, round2, gain, interval, draws} from the evaluate metrics (interval:
    [low, high] of the gain when evaluate resampled the test set; draws: the mean gain over
    training draws {mean, low, high, n, up} when the draws stage ran; else None), [] when absent."""
    if not metrics_file.is_file():
        return []
    try:
        data = json.loads(metrics_file.read_text())
    except json.JSONDecodeError:
        return []
    r1 = numeric_leaves(data.get("round1", {}))
    r2 = numeric_leaves(data.get("round2", {}))
    gain = numeric_leaves(data.get("gain", {}))
    intervals = data.get("gain_interval", {}).get("metrics", {})
    over_draws = data.get("draws", {}).get("summary", {})
    rows = []
    for key in sorted(set(r1) | set(r2)):
        delta = gain.get(key, r2[key] - r1[key] if key in r1 and key in r2 else None)
        iv = intervals.get(key)
        rows.append({"metric": key, "round1": r1.get(key), "round2": r2.get(key), "gain": delta,
                     "interval": [iv["low"], iv["high"]] if iv else None, "draws": over_draws.get(key)})
    return rows


def _interval(row: dict[str, Any]) -> str:
    iv = row.get("interval")
    return f"[{iv[0]:+.3f}, {iv[1]:+.3f}]" if iv else "-"


def _draws(row: dict[str, Any]) -> str:
    d = row.get("draws")
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}], up in {d['up']} of {d['n']}" if d else "-"


def find_reports(root: Path, outs: list[str]) -> dict[str, list[str]]:
    """HTML reports and Data Docs index pages inside the stage outputs (paths relative to root)."""
    reports, docs = [], []
    for rel in outs:
        top = root / rel
        paths = [top] if top.is_file() else sorted(top.rglob("*.html")) if top.is_dir() else []
        for path in paths:
            if path.suffix != ".html":
                continue
            inside = str(path.relative_to(root))
            if "data_docs" in path.parts:  # its front page: data_docs/index.html (or GX's local_site/)
                if path.name == "index.html" and path.parent.name in ("data_docs", "local_site"):
                    docs.append(inside)
            else:
                reports.append(inside)
    return {"reports": reports, "data_docs": docs}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(summary: dict[str, Any]) -> str:
    """The Prefect artifact: stage table, rounds, kept fractions, MLflow link."""
    lines = [f"# capfilt pipeline run ({summary['status']})", "",
             "| stage | status | seconds | MLflow run |", "|---|---|---|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s.get('run_id') or '-'} |")
    if summary.get("rounds"):
        lines += ["", "## Round 1 (noisy) vs round 2 (bootstrapped)", "",
                  "| metric | round 1 | round 2 | gain | gain interval (resampled test set) "
                  "| mean gain over training draws |", "|---|---|---|---|---|---|"]
        for r in summary["rounds"]:
            lines.append(f"| {r['metric']} | {_fmt(r['round1'])} | {_fmt(r['round2'])} | {_fmt(r['gain'])} "
                         f"| {_interval(r)} | {_draws(r)} |")
    if summary.get("kept"):
        lines += ["", "## Kept fractions", ""] + [f"- {k}: {_fmt(v)}" for k, v in summary["kept"].items()]
    if summary.get("promotions"):
        lines += ["", "## Registry", ""] + [f"- {p['message']}" for p in summary["promotions"]]
    if summary.get("mlflow_link"):
        lines += ["", f"MLflow: [{summary['mlflow_link']}]({summary['mlflow_link']})"]
    return "\n".join(lines) + "\n"


def text(summary: dict[str, Any]) -> str:
    """What `capfilt run` prints when the flow is done."""
    width = max([len(s["name"]) for s in summary["stages"]] + [5])
    lines = [f"{'stage':<{width}}  status   seconds"]
    for s in summary["stages"]:
        lines.append(f"{s['name']:<{width}}  {s['status']:<7}  {s['seconds']:7.1f}")
    if summary.get("rounds"):
        lines += ["", "round 1 vs round 2:"]
        lines += [f"  {r['metric']}: {_fmt(r['round1'])} -> {_fmt(r['round2'])} (gain {_fmt(r['gain'])}"
                  + (f", interval {_interval(r)}" if r.get("interval") else "")
                  + (f"; over training draws {_draws(r)})" if r.get("draws") else ")") for r in summary["rounds"]]
    if summary.get("kept"):
        lines += ["", "kept fractions: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary["kept"].items())]
    for p in summary.get("promotions", []):
        lines.append(p["message"])
    for label, key in (("report", "reports"), ("Data Docs", "data_docs")):
        for path in summary.get(key, []):
            lines.append(f"{label}: {path}")
    if summary.get("parent_run_id"):
        lines += ["", f"MLflow run: {summary['parent_run_id']} ({summary['mlflow_link']})",
                  f"MLflow UI:  {summary['ui_command']}"]
    if summary.get("prefect_link"):
        lines.append(f"Prefect:    {summary['prefect_link']}")
    return "\n".join(lines)
