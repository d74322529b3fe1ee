"""Process environment for the flows: offline, quiet, and a project-local Prefect home.

Prefect reads its settings when it is first imported, so `prefect_env` must run before any
`import prefect` (the CLI and the tests call it first). Without `PREFECT_API_URL` Prefect starts
a temporary local API server on a SQLite database in `PREFECT_HOME`, which defaults to `.prefect/`
under the project (git-ignored); with `PREFECT_API_URL` set, flows report to that server. An
explicit setting in the environment always wins over these defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

QUIET_ENV = {
    "DO_NOT_TRACK": "true",  # MLflow accepts only "true"
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # a fresh DB on 2 busy cores: 20-25 s
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def prefect_env(root: Path) -> Path:
    """Set the quiet defaults and PREFECT_HOME (`root/.prefect` unless set); return PREFECT_HOME."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    home = Path(os.environ.setdefault("PREFECT_HOME", str(root.resolve() / ".prefect")))
    home.mkdir(parents=True, exist_ok=True)
    return home
