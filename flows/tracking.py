"""MLflow tracking of pipeline runs: one parent run per flow run, one child run per stage.

The tracking URI comes from `MLFLOW_TRACKING_URI`; without it runs go to `sqlite:///mlflow.db`
at the project root with artifacts in `mlartifacts/`. A remote server is probed first with a short
timeout (and MLflow's own HTTP retries are bounded), so an unreachable endpoint is a one-line
`CapfiltError` naming it instead of minutes of retries. A child run holds its stage's resolved
params sections (flattened, credentials never included), the numbers of its metrics files, its
`loss.csv` curves with steps, and its reports (Data Docs folders, HTML, PNG plots); a stage DVC
skipped is logged the same way and tagged `cached=true`. Everything uses an explicit
`MlflowClient` and run ids, so nothing depends on MLflow's per-thread active run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from components.config import TrackingConfig
from components.errors import CapfiltError
from flows.dvc_graph import StageSpec

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
HOST_TAG, PID_TAG = "capfilt.host", "capfilt.pid"  # who runs a pipeline parent run
_SECRET = re.compile(r"(secret|password|passwd|access_key|credential|api_key)", re.IGNORECASE)
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")
_REPORT_SUFFIXES = {".html", ".png", ".svg"}
_MAX_ARTIFACT_BYTES = 20 * 2**20


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI`, else the project's SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve()}/mlflow.db"


def configure(root: Path, cfg: TrackingConfig) -> str:
    """Point MLflow at the tracking URI with bounded HTTP retries; probe a server. Returns the URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(math.ceil(cfg.timeout_seconds))))
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        probe_http(uri.rstrip("/") + "/health", cfg.timeout_seconds, "MLflow tracking server")
    s3 = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    if s3:  # artifacts written by this client straight to S3: fail now, not after boto3's retries
        probe_http(s3, cfg.timeout_seconds, "S3 endpoint (MLFLOW_S3_ENDPOINT_URL)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def current_uri() -> str:
    """The tracking URI MLflow uses now (for messages)."""
    import mlflow

    return mlflow.get_tracking_uri()


def probe_http(url: str, timeout: float, what: str) -> None:
    """GET `url` until it answers (any HTTP status) or `timeout` seconds pass; else CapfiltError."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=max(0.5, deadline - time.monotonic())):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (OSError, ValueError) as exc:
            last = exc
            time.sleep(0.5)
    raise CapfiltError(f"{what} at {url} is unreachable after {timeout:.0f} s ({last}); "
                       "start it (`capfilt stack up`) or unset the variable that points at it")


def experiment_id(root: Path, name: str) -> str:
    """The experiment's id, created with artifacts in `mlartifacts/` for a local store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri(root).startswith("sqlite:"):
        location = (root.resolve() / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


# --- flattening ------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted leaves of nested mappings: {"a": {"b": 1}} -> ("a.b", 1)."""
    if isinstance(value, Mapping):
        for key, sub in value.items():
            yield from flatten(sub, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, value


def pick(resolved: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted key of a nested mapping; KeyError when absent."""
    node: Any = resolved
    for part in dotted.split("."):
        node = node[part]
    return node


def stage_params(resolved: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    """Flattened params of a stage (its dvc.yaml `params:` keys), credentials dropped."""
    out: dict[str, str] = {}
    for key in keys:
        try:
            value = pick(resolved, key)
        except (KeyError, TypeError):
            continue  # a key of another params file; DVC checks it, not us
        for name, leaf in flatten(value, key):
            if not _SECRET.search(name):
                out[name] = json.dumps(leaf) if isinstance(leaf, (list, dict)) else str(leaf)
    return out


def numeric_leaves(data: Any, prefix: str = "") -> dict[str, float]:
    """Finite numbers (bools excluded) of a metrics mapping, keyed by a metric-safe dotted name."""
    out = {}
    for name, leaf in flatten(data, prefix):
        if isinstance(leaf, (int, float)) and not isinstance(leaf, bool) and math.isfinite(leaf):
            out[_BAD_KEY_CHARS.sub("_", name)] = float(leaf)
    return out


def read_curves(path: Path) -> list[tuple[int, dict[str, float]]]:
    """loss.csv rows as (step, {column: value}); non-numeric and NaN cells are skipped. A plot
    without a `step` column is not a curve over steps: [] (it is still logged as a file)."""
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "step" not in (reader.fieldnames or []):
            return []
        for row in reader:
            try:
                step = int(float(row.pop("step")))
            except (KeyError, TypeError, ValueError):
                raise CapfiltError(f"{path}: a row without a numeric `step` column") from None
            values = {}
            for key, cell in row.items():
                try:
                    v = float(cell)
                except (TypeError, ValueError):
                    continue
                if math.isfinite(v):
                    values[_BAD_KEY_CHARS.sub("_", key)] = v
            rows.append((step, values))
    return rows


# --- logging a stage ---------------------------------------------------------------------------


def start_run(exp_id: str, name: str, tags: Mapping[str, str], parent: str | None = None) -> str:
    from mlflow.tracking import MlflowClient

    all_tags = dict(tags) | ({PARENT_TAG: parent} if parent else {})
    return MlflowClient().create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def owner_tags() -> dict[str, str]:
    """Tags naming this process, so a later run can tell an orphaned parent run (see below)."""
    import socket

    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def close_orphans(exp_id: str) -> list[str]:
    """Mark RUNNING runs whose owning process on this host is gone (killed flow) as KILLED.

    A SIGKILLed `capfilt run` cannot end its MLflow runs; the next run on the same host ends
    them, and their child stage runs, so the UI never shows a dead run as running. Runs started
    elsewhere, or by a live process, are left alone. Returns the ids it ended.
    """
    import socket

    from mlflow.tracking import MlflowClient

    client, host = MlflowClient(), socket.gethostname()
    running = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    owners = {r.info.run_id: r.data.tags for r in running}
    orphans = {run_id for run_id, tags in owners.items()
               if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit()
               and not _alive(int(tags[PID_TAG]))}
    children = {run_id for run_id, tags in owners.items() if tags.get(PARENT_TAG) in orphans}
    ended = sorted(orphans | children)
    for run_id in ended:
        client.set_terminated(run_id, "KILLED")
    if ended:
        log.warning("marked %d run(s) of a killed pipeline as KILLED", len(ended))
    return ended


def end_run(run_id: str, ok: bool) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_params(run_id: str, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    items = [Param(k[:250], v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        MlflowClient().log_batch(run_id, params=items[i : i + 100])


def log_metrics(run_id: str, values: Mapping[str, float], step: int = 0) -> None:
    log_series(run_id, [(step, dict(values))])


def log_series(run_id: str, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Metrics with steps, in batches of 1000."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for step, values in rows for k, v in values.items()]
    for i in range(0, len(items), 1000):
        MlflowClient().log_batch(run_id, metrics=items[i : i + 1000])


def stage_metrics(root: Path, spec: StageSpec) -> dict[str, float]:
    """The numbers of a stage's metrics files (prefixed by the file's stem when it has several)."""
    out: dict[str, float] = {}
    for rel in spec.metrics:
        path = root / rel
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CapfiltError(f"{path}: not valid JSON ({exc})") from None
        out |= numeric_leaves(data, Path(rel).stem if len(spec.metrics) > 1 else "")
    return out


def _report_files(root: Path, spec: StageSpec) -> Iterator[tuple[Path, str]]:
    """(local path, artifact folder) of a stage's reports: metrics, plots, HTML, PNG, Data Docs."""
    for rel in spec.metrics + spec.plots:
        if (root / rel).is_file():
            yield root / rel, str(Path(rel).parent)
    for rel in spec.outs:
        top = root / rel
        if top.is_file() and top.suffix in _REPORT_SUFFIXES:
            yield top, str(Path(rel).parent)
        if not top.is_dir():
            continue
        for path in sorted(top.rglob("*")):
            inside = path.relative_to(root)
            if "data_docs" in inside.parts[:-1]:
                continue  # the whole Data Docs folder goes as one tree below
            if path.name == "data_docs" and path.is_dir():
                yield path, str(inside)
            elif path.is_file() and path.suffix in _REPORT_SUFFIXES and "model" not in inside.parts:
                yield path, str(inside.parent)


def log_stage_files(run_id: str, root: Path, spec: StageSpec) -> int:
    """Log a stage's report files; returns how many paths were logged."""
    from mlflow.tracking import MlflowClient

    client, n = MlflowClient(), 0
    for path, folder in _report_files(root, spec):
        if path.is_dir():
            client.log_artifacts(run_id, str(path), folder)
        elif path.stat().st_size <= _MAX_ARTIFACT_BYTES:
            client.log_artifact(run_id, str(path), folder)
        n += 1
    return n


def log_stage(exp_id: str, parent: str, root: Path, spec: StageSpec, resolved: Mapping[str, Any],
              info: Mapping[str, str]) -> str:
    """One child run for a finished stage (ran or cached); returns its run id."""
    from mlflow.tracking import MlflowClient

    tags = {"stage": spec.name, **info}
    run_id = start_run(exp_id, spec.name, tags, parent=parent)
    ok = False
    try:
        params = stage_params(resolved, spec.params)
        log_params(run_id, params)
        log_metrics(run_id, stage_metrics(root, spec))
        for rel in spec.plots:
            if (root / rel).is_file() and rel.endswith(".csv"):
                log_series(run_id, read_curves(root / rel))
        picked = {k: pick(resolved, k) for k in spec.params if _has(resolved, k)}
        MlflowClient().log_text(run_id, yaml.safe_dump(picked, sort_keys=False), "params.yaml")
        log_stage_files(run_id, root, spec)
        ok = True
    finally:
        end_run(run_id, ok)
    return run_id


def _has(resolved: Mapping[str, Any], key: str) -> bool:
    try:
        pick(resolved, key)
    except (KeyError, TypeError):
        return False
    return True


def run_link(uri: str, exp_id: str, run_id: str) -> str:
    """Where to see a run: the server's page, or the page `mlflow ui` will serve for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


def ui_command(uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1"
