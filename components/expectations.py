"""Dataset-level expectations on manifests, run with Great Expectations, with Data Docs.

The pandera schemas (components/schemas.py) check each row; this module checks the table as a
whole: enough rows, null and duplicate fractions, the caption-length distribution, image-size
bounds, the allowed sources and, for bootstrapped manifests, the source mix and the ITM score
range. Thresholds come from `ValidationConfig` (`validation:` in params.yaml). `run_expectations`
builds the suite for a manifest kind in a throw-away file-mode GX project inside a temporary
folder (so GX writes nothing in the repository or the working directory), validates, writes
`out_dir/expectations.json` and copies the rendered Data Docs site to `out_dir/data_docs/`. It
returns an `ExpectationReport` and never raises on failed expectations; `require` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from components import atomic
from components.config import ValidationConfig
from components.errors import CapfiltError
from components.schemas import INGESTED_SOURCES, REJECT_REASONS, SOURCES, ManifestKind

log = logging.getLogger(__name__)

KEY_COLUMNS = ("sample_id", "image_key", "caption", "source", "split", "width", "height", "sha256")
CAPTION_CHARS = "caption_chars"  # derived column: characters per caption
IS_SYNTHETIC = "is_synthetic"  # derived column: 1.0 for synthetic rows, so its mean is the fraction
_ALLOWED_SOURCES = {"ingested": INGESTED_SOURCES, "bootstrapped": SOURCES}
_GX_LOGGERS = ("great_expectations", "great_expectations.core", "great_expectations.data_context")


@dataclass(frozen=True)
class ExpectationReport:
    """The outcome of one suite run; `results` holds one plain dict per expectation."""

    success: bool
    evaluated: int
    failed: int
    results: list[dict[str, Any]]
    docs_index: Path | None

    def summary(self) -> str:
        """Readable text: one line per failed expectation (or one line saying all passed)."""
        if self.success:
            return f"all {self.evaluated} expectations passed"
        lines = [f"{self.failed} of {self.evaluated} expectations failed:"]
        lines += [f"  {_describe_result(r)}" for r in self.results if not r["success"]]
        if self.docs_index is not None:
            lines.append(f"  (Data Docs: {self.docs_index})")
        return "\n".join(lines)


def _describe_result(r: dict[str, Any]) -> str:
    target = r.get("column") or ",".join(r.get("columns") or []) or "table"
    expected = ", ".join(f"{k}={_fmt(v)}" for k, v in r["kwargs"].items())
    if r.get("error"):
        got = f"error: {r['error']}"
    elif "unexpected_count" in r:
        got = (f"{r['unexpected_count']} of {r.get('element_count')} rows unexpected"
               f" ({_fmt(r.get('unexpected_percent'))}%)")
        if r.get("examples"):
            got += f", e.g. {_fmt(r['examples'])}"
    else:
        got = f"observed {_fmt(r.get('observed'))}"
    hint = f" (params: validation.{r['params']})" if r.get("params") else ""
    return f"{r['expectation']}({target}): {got}" + (f"; expected {expected}" if expected else "") + hint


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def suite_name(kind: ManifestKind) -> str:
    """The name of the suite for a kind, as shown in Data Docs."""
    return f"capfilt_{kind}"


def _expectations(kind: ManifestKind, cfg: ValidationConfig) -> list[Any]:
    """The suite for `kind`: a short list of dataset-level expectations, thresholds from cfg."""
    import great_expectations.expectations as gxe

    if kind == "rejects":  # an empty rejects table is the good case
        return [gxe.ExpectColumnValuesToNotBeNull(column="ref"),
                gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=list(REJECT_REASONS))]
    keep = 1.0 - cfg.max_null_fraction

    def params(names: str) -> dict[str, Any]:  # the `validation` params a failure message names
        return {"meta": {"params": names}}

    out: list[Any] = [gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, **params("min_rows"))]
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c, mostly=keep, **params("max_null_fraction"))
            for c in KEY_COLUMNS]
    out += [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),
        # `mostly` counts every row of a repeated pair, the first occurrence included
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["image_key", "caption"],
                                            mostly=1.0 - cfg.max_duplicate_pair_fraction,
                                            **params("max_duplicate_pair_fraction")),
        gxe.ExpectColumnMeanToBeBetween(column=CAPTION_CHARS, min_value=cfg.caption_mean_chars_min,
                                        max_value=cfg.caption_mean_chars_max,
                                        **params("caption_mean_chars_min / caption_mean_chars_max")),
        # quantile bounds as `mostly`: q05 >= min  <=>  at least 95 % of captions are >= min
        # (ExpectColumnQuantileValuesToBeBetween cannot store its result under numpy 2)
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=cfg.caption_q05_chars_min,
                                                mostly=0.95, **params("caption_q05_chars_min")),
        gxe.ExpectColumnValueLengthsToBeBetween(column="caption", max_value=cfg.caption_q95_chars_max,
                                                mostly=0.95, **params("caption_q95_chars_max")),
        *(gxe.ExpectColumnValuesToBeBetween(column=side, min_value=cfg.min_side, max_value=cfg.max_side,
                                            **params("min_side / max_side"))
          for side in ("width", "height")),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(_ALLOWED_SOURCES[kind])),
    ]
    if kind == "bootstrapped":
        out += [
            gxe.ExpectColumnMeanToBeBetween(column=IS_SYNTHETIC, min_value=cfg.min_synthetic_fraction,
                                            max_value=cfg.max_synthetic_fraction,
                                            **params("min_synthetic_fraction / max_synthetic_fraction")),
            gxe.ExpectColumnDistinctValuesToContainSet(column="source", value_set=["human"]),
            gxe.ExpectColumnValuesToBeBetween(column="itm_score", min_value=0.0, max_value=1.0),
        ]
    return out


def _with_derived_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of df plus the columns the suite measures but a manifest does not store."""
    out = df.copy()
    if "caption" in out.columns:
        out[CAPTION_CHARS] = out["caption"].str.len().astype("float64")
    if "source" in out.columns:
        out[IS_SYNTHETIC] = (out["source"] == "synthetic").astype("float64")
    return out


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Silence GX's INFO chatter for the duration of a run, then restore the log levels."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    loggers = [logging.getLogger(n) for n in _GX_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_expectations(df: pd.DataFrame, kind: ManifestKind, cfg: ValidationConfig, out_dir: Path,
                     name: str) -> ExpectationReport:
    """Validate `df` against the `kind` suite; write `out_dir/expectations.json` and
    `out_dir/data_docs/`. `name` labels the data asset and run in Data Docs (e.g. "ingest").
    Failed expectations are reported, not raised: pass the report to `require` to stop."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "manifest"  # GX stores it as a file name
    with _quiet_gx(), tempfile.TemporaryDirectory(prefix="capfilt-gx-") as root:
        vr, site = _validate_in_project(Path(root), _with_derived_columns(df), kind, cfg, name)
        docs_index = _install_docs(site, out_dir / "data_docs")
    results = [_result_dict(er) for er in vr.results]
    failed = sum(not r["success"] for r in results)
    report = ExpectationReport(success=bool(vr.success), evaluated=len(results), failed=failed,
                               results=results, docs_index=docs_index)
    atomic.write_json(out_dir / "expectations.json", _report_json(report, kind, name))
    log.info("%s (%s): %s", name, kind, report.summary().splitlines()[0])
    return report


def _validate_in_project(root: Path, batch: pd.DataFrame, kind: ManifestKind, cfg: ValidationConfig,
                         name: str) -> tuple[Any, Path]:
    """Run the suite in a fresh file-mode GX project under `root`; return the validation result
    and the folder of the rendered Data Docs site."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    ctx.variables.save()
    batch_def = (ctx.data_sources.add_pandas("capfilt").add_dataframe_asset(name)
                 .add_batch_definition_whole_dataframe("whole"))
    suite = ctx.suites.add(gx.ExpectationSuite(name=suite_name(kind)))
    for expectation in _expectations(kind, cfg):
        suite.add_expectation(expectation)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[vd],
        actions=[UpdateDataDocsAction(name="update_data_docs")],
        result_format={"result_format": "SUMMARY"}))
    result = checkpoint.run(batch_parameters={"dataframe": batch})
    (vr,) = result.run_results.values()
    # GX groups results by domain; list them in suite order so the JSON reads like the suite
    order = {e.id: i for i, e in enumerate(suite.expectations)}
    vr.results.sort(key=lambda er: order.get(er.expectation_config.id, len(order)))
    return vr, root / "gx" / "uncommitted" / "data_docs" / "local_site"


def _install_docs(site: Path, dest: Path) -> Path | None:
    """Copy a rendered site to `dest`, replacing an older one with a rename (never half-written)."""
    if not (site / "index.html").is_file():
        log.warning("Great Expectations rendered no Data Docs under %s", site)
        return None
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
    shutil.copytree(site, staging)
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.old")
    if dest.exists():
        os.replace(dest, old)
    os.replace(staging, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest / "index.html"


def _result_dict(er: Any) -> dict[str, Any]:
    """One expectation result as plain, JSON-ready data."""
    cfg = er.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "column_list", "batch_id")}
    res = er.result or {}
    out: dict[str, Any] = {"expectation": cfg.type, "success": bool(er.success)}
    if (cfg.meta or {}).get("params"):
        out["params"] = cfg.meta["params"]
    if "column" in cfg.kwargs:
        out["column"] = cfg.kwargs["column"]
    if "column_list" in cfg.kwargs:
        out["columns"] = list(cfg.kwargs["column_list"])
    out["kwargs"] = _plain(kwargs)
    if "observed_value" in res:
        out["observed"] = _plain(res["observed_value"])
    if "unexpected_count" in res:
        out["element_count"] = _plain(res.get("element_count"))
        out["unexpected_count"] = _plain(res["unexpected_count"])
        out["unexpected_percent"] = _plain(res.get("unexpected_percent"))
        out["examples"] = _plain(list(res.get("partial_unexpected_list") or [])[:5])
    error = _error_message(er.exception_info or {})
    if error:
        out["error"] = error
    return out


def _error_message(info: dict[str, Any]) -> str | None:
    """The first exception message of a result: GX keeps one at the top or one per metric."""
    candidates = [info, *(v for v in info.values() if isinstance(v, dict))]
    for c in candidates:
        if c.get("raised_exception") or c.get("exception_message"):
            text = str(c.get("exception_message") or "unknown error").strip().splitlines()[0]
            return text.removeprefix("Error: ")[:200]
    return None


def _plain(value: Any) -> Any:
    """numpy scalars, tuples and NaN made JSON-safe (NaN -> None) so the file stays valid JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _report_json(report: ExpectationReport, kind: ManifestKind, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "suite": suite_name(kind),
        "success": report.success,
        "statistics": {"evaluated": report.evaluated, "failed": report.failed,
                       "successful": report.evaluated - report.failed},
        "results": report.results,
    }


def require(report: ExpectationReport, where: str) -> None:
    """Raise a CapfiltError with the report's summary if any expectation failed."""
    if not report.success:
        raise CapfiltError(f"{where}: {report.summary()}")
