"""Shared set-up of the flow tests: a quiet environment with a private Prefect home (set before
anything imports Prefect), and a throw-away git + DVC copy of the project on a shrunken corpus."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

_PREFECT_HOME = tempfile.mkdtemp(prefix="capfilt-test-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # no INFO lines into closed capture streams at exit
os.environ.pop("MLFLOW_TRACKING_URI", None)
from flows.settings import prefect_env  # noqa: E402

prefect_env(ROOT)

# A model small enough for seconds-long training stages (as in tests/components).
TINY_MODEL = ("{vision.image_size: 32, vision.patch_size: 8, vision.width: 64, vision.depth: 2, "
              "vision.heads: 2, text.hidden_size: 64, text.num_layers: 2, text.num_heads: 2, "
              "text.intermediate_size: 128, text.max_position_embeddings: 48, embed_dim: 32, "
              "queue_size: 64}")
SHRINK = [f"model.overrides={TINY_MODEL}", "train.micro_batch=8", "train.threads=1", "train.log_every=1",
          "ingest.workers=1", "bootstrap.batch_size=8", "bootstrap.itm_threshold=0.0",
          "bootstrap.synthetic_threshold=null", "bootstrap.synthetic_confidence=null",
          "bootstrap.min_filter_auroc=null",  # a 2-step filter is random
          "evaluate.batch_size=8", "evaluate.k_test=4", "evaluate.grid_images=4"] + [
    f"{s}.schedule.{k}={v}"
    for s in ("pretrain", "retrain", "finetune.captioner", "finetune.filter")
    for k, v in (("steps", 2), ("warmup_steps", 0))]
PROJECT_FILES = ("components", "models", "flows", "dvc.yaml", "params.yaml", ".dvcignore")


def sh(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, **kw)
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def init_repo(root: Path) -> None:
    """git + dvc in `root`, offline, with a committer identity."""
    sh(["git", "init", "-q", "-b", "main"], root)
    sh(["git", "config", "user.email", "ci@example.invalid"], root)
    sh(["git", "config", "user.name", "ci"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    sh([str(BIN / "dvc"), "config", "core.check_update", "false"], root)


def commit_all(root: Path, message: str) -> str:
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-q", "-m", message], root)
    return sh(["git", "rev-parse", "HEAD"], root).stdout.strip()


@pytest.fixture()
def mini_project(tmp_path) -> Path:
    """A copy of the project (code, dvc.yaml, params.yaml) on a 24/24/8-image corpus, committed."""
    root = tmp_path / "project"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, root / name)
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n/.prefect/\n__pycache__/\n")
    init_repo(root)
    sh([str(BIN / "capfilt"), "synth", "--out", "data", "--set", "synth.n_human=24",
        "--set", "synth.n_web=24", "--set", "synth.n_test=8"], root)
    sh([str(BIN / "dvc"), "add", "-q", "data"], root)
    commit_all(root, "mini project")
    return root


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store for one test."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture()
def tiny_project(tmp_path) -> Path:
    """A committed git + DVC repo with the two-stage tiny pipeline and its corpus added."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_pipeline import write_tiny

    root = tmp_path / "tiny"
    root.mkdir()
    write_tiny(root)
    init_repo(root)
    sh([str(BIN / "dvc"), "add", "-q", "data"], root)
    commit_all(root, "tiny pipeline")
    return root
