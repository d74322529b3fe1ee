"""`capfilt schedule --cron "0 3 * * 1"`: the pipeline flow served as a cron deployment.

`serve` registers a deployment `<flow name>/<name>` with the cron schedule on the Prefect API
(`PREFECT_API_URL`, or the temporary local server) and then blocks, polling for scheduled runs and
executing each in this process, from the project root. The deployment's parameters fix the
project root, the params file, a stage subset and overrides; `dry_run` makes scheduled runs only
list their stages (handy to try a schedule). Stop it with Ctrl-C or SIGTERM: Prefect pauses the
deployment, and the next `serve` resumes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components.config import load_params
from components.errors import CapfiltError

log = logging.getLogger(__name__)


def deployment_parameters(root: Path, params_file: str, stages: list[str], overrides: list[str],
                          dry_run: bool) -> dict[str, Any]:
    """The flow parameters every scheduled run gets."""
    return {"root": str(root.resolve()), "params_file": params_file, "stages": stages or None,
            "overrides": overrides or None, "dry_run": dry_run}


def cron_schedule(cron: str, timezone: str) -> Any:
    """Prefect's CronSchedule; a bad expression or timezone is a CapfiltError naming it."""
    from prefect.client.schemas.schedules import CronSchedule

    if len(cron.split()) != 5:
        raise CapfiltError(f"--cron {cron!r}: expected five fields, e.g. '0 3 * * 1' (Mondays 03:00)")
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        raise CapfiltError(f"--cron {cron!r} / --timezone {timezone!r}: {exc}") from None


def serve(cron: str, name: str, root: Path, params_file: str = "params.yaml", stages: list[str] | None = None,
          overrides: list[str] | None = None, timezone: str = "UTC", dry_run: bool = False) -> None:
    """Register the cron deployment and execute its runs until stopped."""
    from flows.pipeline import pipeline

    schedule = cron_schedule(cron, timezone)
    flow_name = load_params(root / params_file, overrides).pipeline.flow_name
    flow = pipeline.with_options(name=flow_name)
    params = deployment_parameters(root, params_file, stages or [], overrides or [], dry_run)
    log.info("serving %s/%s on cron %r (%s)", flow_name, name, cron, timezone)
    flow.serve(name=name, schedules=[schedule], parameters=params,
               tags=["capfilt"], print_starting_message=True)
