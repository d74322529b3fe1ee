"""The pipeline flow: every `dvc.yaml` stage as one Prefect task, tracked in MLflow, then promote.

`pipeline(...)` reads the stages DVC declares, runs the selected ones upstream-first with
`dvc repro --single-item NAME` (one task each, so the Prefect UI shows each stage's state, logs,
duration and retries), and logs a parent MLflow run with one child run per stage. A stage that
`dvc status` reported unchanged, and whose upstream stages did not run, is not even started: it is
reported `cached` (as are stages DVC itself skips). A stage that still fails after
`pipeline.retries` extra attempts fails the flow with DVC's error tail. Parameter overrides
(`section.key=value`) are validated, then written into `params.yaml` the way `dvc exp run -S` does
(comments kept), so `dvc.lock` and the MLflow params snapshot record exactly what ran. After the
stages, the promote step registers the exported models and moves `champion` when better.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from components.config import Params, load_params
from components.errors import CapfiltError
from flows import dvc_graph, summary, tracking
from flows.dvc_graph import StageSpec

log = logging.getLogger(__name__)
progress = logging.getLogger("flows.progress")


def apply_overrides(params_file: Path, overrides: list[str]) -> None:
    """Validate `section.key=value` overrides, then write them into the params file in place."""
    if not overrides:
        return
    import yaml
    from dvc.utils.serialize import modify_yaml

    load_params(params_file, overrides)  # a bad key or value stops here, naming it
    with modify_yaml(str(params_file)) as data:
        for item in overrides:
            dotted, value = item.split("=", 1)
            keys = dotted.strip().split(".")
            node = data
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = yaml.safe_load(value)


@task(cache_policy=NO_CACHE)
def run_stage(root: str, name: str, force: bool) -> dict[str, Any]:
    """`dvc repro --single-item NAME`; raises (and so retries) on a non-zero exit."""
    started = time.monotonic()
    result = dvc_graph.repro(Path(root), name, force)
    logger = get_run_logger()
    logger.info("%s", result.output[-4000:].strip() or "(no output)")
    return {"ran": result.ran, "seconds": time.monotonic() - started}


@task(cache_policy=NO_CACHE)
def promote(root: str, parent_run_id: str, params: Params) -> list[dict[str, Any]]:
    """Register every exported model that exists and move `champion` when it is better."""
    from flows import registry

    return registry.register_all(Path(root), params, parent_run_id)


def _stage_step(root: Path, spec: StageSpec, force: bool, skip: bool, params: Params) -> dict[str, Any]:
    """Run (or skip) one stage as a task; returns its row of the stage table."""
    if skip:
        progress.info("%-22s cached (unchanged)", spec.name)
        return {"name": spec.name, "status": "cached", "seconds": 0.0}
    progress.info("%-22s running ...", spec.name)
    stage_task = run_stage.with_options(name=f"stage-{spec.name}", task_run_name=spec.name,
                                        retries=params.pipeline.retries,
                                        retry_delay_seconds=params.pipeline.retry_delay_seconds)
    out = stage_task(str(root), spec.name, force)
    status = "ran" if out["ran"] else "cached"
    progress.info("%-22s %s in %.1f s", spec.name, status, out["seconds"])
    return {"name": spec.name, "status": status, "seconds": out["seconds"]}


def _flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id or "")


def _prefect_link() -> str:
    """The flow run's page when a Prefect server (not the temporary one) is in use."""
    import os

    from prefect.runtime import flow_run

    return str(flow_run.ui_url or "") if os.environ.get("PREFECT_API_URL") else ""


def _finish_parent(root: Path, parent: str, params: Params, ok: bool) -> None:
    """Data-version tags, the resolved params, dvc.lock and data.dvc on the parent run."""
    import yaml
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in dvc_graph.data_versions(root).items():
        client.set_tag(parent, key, value)
    client.set_tag(parent, "mlflow.source.git.commit", dvc_graph.git_commit(root)[0])
    client.log_text(parent, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False),
                    "params.resolved.yaml")
    for name in ("dvc.lock", "data.dvc"):
        if (root / name).is_file():
            client.log_artifact(parent, str(root / name), "dvc")
    metrics_file = root / params.promote.metrics_file
    if metrics_file.is_file():
        tracking.log_metrics(parent, tracking.stage_metrics(root, _metrics_only(metrics_file, root)))
    tracking.end_run(parent, ok)


def _metrics_only(path: Path, root: Path) -> StageSpec:
    return StageSpec("evaluate", "", (), (str(path.relative_to(root)),), (), (), (), ())


def _summary(root: Path, rows: list[dict[str, Any]], specs: list[StageSpec], params: Params,
             ctx: dict[str, str]) -> dict[str, Any]:
    kept: dict[str, float] = {}
    for spec in specs:
        kept |= {f"{spec.name}.{k}": v for k, v in tracking.stage_metrics(root, spec).items() if "kept" in k}
    outs = [o for spec in specs for o in spec.outs]
    return {"status": ctx.get("status", "completed"), "stages": rows,
            "rounds": summary.round_table(root / params.promote.metrics_file), "kept": kept,
            **summary.find_reports(root, outs), **ctx}


@flow(name="capfilt-pipeline")
def pipeline(stages: list[str] | None = None, overrides: list[str] | None = None, force: bool = False,
             dry_run: bool = False, root: str = ".", params_file: str = "params.yaml") -> dict[str, Any]:
    """Run the dvc.yaml stages (all, or `stages`) as tasks; track them; promote the models."""
    base = Path(root).resolve()
    apply_overrides(base / params_file, overrides or [])
    params = load_params(base / params_file)
    specs = dvc_graph.select(dvc_graph.read_stages(base), stages or params.pipeline.stages)
    if dry_run:  # the plan only: nothing runs, nothing is tracked
        rows = [{"name": s.name, "status": "planned", "seconds": 0.0} for s in specs]
        return {"status": "dry-run", "stages": rows, "rounds": [], "kept": {}}
    uri = tracking.configure(base, params.tracking)
    exp_id = tracking.experiment_id(base, params.tracking.experiment)
    tracking.close_orphans(exp_id)
    parent = tracking.start_run(exp_id, "pipeline", {"prefect_flow_run_id": _flow_run_id(),
                                                     "stages": ",".join(s.name for s in specs),
                                                     **tracking.owner_tags()})
    tracking.log_params(parent, {"force": str(force), "stages": ",".join(s.name for s in specs),
                                 **{f"override.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in overrides or []}})
    ctx = {"parent_run_id": parent, "mlflow_uri": uri, "mlflow_link": tracking.run_link(uri, exp_id, parent),
           "ui_command": tracking.ui_command(uri), "prefect_link": _prefect_link()}
    try:
        rows = _run_stages(base, specs, params, force, exp_id, parent)
        ok = all(r["status"] != "failed" for r in rows)
        promotions = promote(str(base), parent, params) if ok and params.pipeline.promote else []
    except BaseException:
        tracking.end_run(parent, False)  # never leave the parent RUNNING
        raise
    _finish_parent(base, parent, params, ok)
    result = _summary(base, rows, specs, params, ctx | {"status": "completed" if ok else "failed"})
    result["promotions"] = promotions
    create_markdown_artifact(key="capfilt-run", markdown=summary.markdown(result),
                             description="capfilt pipeline: stages, rounds, MLflow")
    if not ok:
        failed = next(r for r in rows if r["status"] == "failed")
        raise CapfiltError(f"stage {failed['name']} failed:\n{failed['error']}")
    return result


def _run_stages(root: Path, specs: list[StageSpec], params: Params, force: bool, exp_id: str,
                parent: str) -> list[dict[str, Any]]:
    """Each stage in order; a failure stops the rest (their rows say `not run`)."""
    changed = set() if force else dvc_graph.changed_stages(root)
    resolved = params.model_dump(mode="json")
    rows: list[dict[str, Any]] = []
    ran: set[str] = set()
    for i, spec in enumerate(specs):
        skip = not force and spec.name not in changed and not (set(spec.upstream) & ran)
        try:
            row = _stage_step(root, spec, force, skip, params)
        except Exception as exc:  # the task's error after its retries: recorded, then the flow fails
            rows.append({"name": spec.name, "status": "failed", "seconds": 0.0, "error": str(exc)[-3000:]})
            rows += [{"name": s.name, "status": "not run", "seconds": 0.0} for s in specs[i + 1:]]
            return rows
        if row["status"] == "ran":
            ran.add(spec.name)
        row["run_id"] = tracking.log_stage(exp_id, parent, root, spec, resolved,
                                           {"cached": str(row["status"] == "cached").lower(),
                                            "seconds": f"{row['seconds']:.2f}"})
        rows.append(row)
    return rows
