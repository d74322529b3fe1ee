"""`capfilt compare RUN_A RUN_B`: two pipeline runs side by side.

A pipeline run's params are its own (overrides, stage list) plus those of its stage child runs
(the resolved params sections, the same key in two stages holding the same value); its headline
metrics are the parent run's (the evaluate metrics) or, before an evaluate stage exists, the final
values of every stage's metrics prefixed by the stage; its data versions are the tags the flow
wrote (git commit, `data.dvc` md5, `dvc.lock` sha256). Only params that differ are listed.
"""

from __future__ import annotations

from typing import Any

from components.errors import CapfiltError
from flows.tracking import PARENT_TAG

DATA_TAGS = ("git_commit", "git_dirty", "data_md5", "dvc_lock_sha256", "prefect_flow_run_id")


def _get_run(run_id: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException:
        raise CapfiltError(f"no MLflow run {run_id!r} in {_uri()}") from None


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _children(run: Any) -> list[Any]:
    from mlflow.tracking import MlflowClient

    query = f"tags.`{PARENT_TAG}` = '{run.info.run_id}'"
    return MlflowClient().search_runs([run.info.experiment_id], filter_string=query, max_results=500)


def describe(run_id: str) -> dict[str, Any]:
    """{params, metrics, data} of a pipeline run (or of a single stage run)."""
    run = _get_run(run_id)
    params = dict(run.data.params)
    metrics = dict(run.data.metrics)
    stage_metrics: dict[str, float] = {}
    for child in _children(run):
        params |= child.data.params
        stage = child.data.tags.get("stage", child.info.run_name)
        stage_metrics |= {f"{stage}/{k}": v for k, v in child.data.metrics.items()}
    return {"run_id": run_id, "name": run.info.run_name, "params": params,
            "metrics": metrics or stage_metrics,
            "data": {k: run.data.tags.get(k, "") for k in DATA_TAGS}}


def compare(run_a: str, run_b: str) -> dict[str, Any]:
    """The differing params, all headline metrics and the data versions of two runs."""
    a, b = describe(run_a), describe(run_b)
    keys = sorted(set(a["params"]) | set(b["params"]))
    differ = [(k, a["params"].get(k), b["params"].get(k)) for k in keys
              if a["params"].get(k) != b["params"].get(k)]
    metric_keys = sorted(set(a["metrics"]) | set(b["metrics"]))
    metrics = [(k, a["metrics"].get(k), b["metrics"].get(k)) for k in metric_keys]
    data = [(k, a["data"][k], b["data"][k]) for k in DATA_TAGS]
    return {"runs": (run_a, run_b), "params": differ, "metrics": metrics, "data": data}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table per section."""
    a, b = result["runs"]
    lines = []
    for title, rows in (("params that differ", result["params"]), ("metrics", result["metrics"]),
                        ("data versions", result["data"])):
        lines.append(f"== {title} ==")
        if not rows:
            lines.append("  (none)")
            continue
        width = max(len(r[0]) for r in rows)
        lines.append(f"  {'':<{width}}  {a[:12]:<40}  {b[:12]}")
        lines += [f"  {k:<{width}}  {_cell(x):<40}  {_cell(y)}" for k, x, y in rows]
    return "\n".join(lines)
