"""The DVC side of the pipeline: which stages `dvc.yaml` declares, in what order, and running one.

Everything here is generic over `dvc.yaml`: stages (with `foreach` expanded, e.g.
`finetune@captioner`), their params keys, metrics and plots files come from DVC's own index, and
the order is a topological sort of DVC's stage graph, so the flow works with one stage or twenty.
Stages are run one at a time with `dvc repro --single-item NAME` in a subprocess (never two DVC
commands at once in one workspace); a failure becomes a `CapfiltError` carrying the command's
stderr tail. The data versions of a run (git commit, `data.dvc` md5, `dvc.lock` sha256) are read
here too, so tracking and reproduction agree on what they mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from components import children
from components.errors import CapfiltError

log = logging.getLogger(__name__)

_SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
_RAN = re.compile(r"Running stage '([^']+)'")
_TAIL_CHARS = 3000


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage as DVC resolved it."""

    name: str  # DVC address: `ingest`, `finetune@captioner`
    cmd: str
    params: tuple[str, ...]  # params.yaml keys or whole sections, e.g. ("model", "finetune.captioner")
    metrics: tuple[str, ...]  # metrics files (json), relative to the repo root
    plots: tuple[str, ...]  # plots files (csv/json/png), relative to the repo root
    outs: tuple[str, ...]  # every output path (cached or not)
    deps: tuple[str, ...]  # file and folder dependencies (params excluded)
    upstream: tuple[str, ...]  # names of the pipeline stages it depends on

    @property
    def alias(self) -> str:
        """The `capfilt stage NAME` name when the cmd is one, else the DVC name."""
        parts = self.cmd.split()
        if len(parts) >= 3 and parts[0].endswith("capfilt") and parts[1] == "stage":
            return parts[2]
        return self.name


def _stage_spec(stage, upstream: list[str]) -> StageSpec:
    from dvc.dependency.param import ParamsDependency

    params: list[str] = []
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            params.extend(dep.params or [])
    outs = [str(o.def_path) for o in stage.outs]
    metrics = [str(o.def_path) for o in stage.outs if o.metric]
    plots = [str(o.def_path) for o in stage.outs if o.plot]
    cmd = stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd)
    deps = [str(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)]
    return StageSpec(stage.name, cmd, tuple(params), tuple(metrics), tuple(plots),
                     tuple(outs), tuple(deps), tuple(upstream))


def read_stages(root: Path) -> list[StageSpec]:
    """Every stage with a command in `root/dvc.yaml`, upstream first (stable, file order ties)."""
    if not (root / "dvc.yaml").is_file():
        raise CapfiltError(f"{root / 'dvc.yaml'}: not found; run from the project root")
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            stages = [s for s in repo.index.stages if getattr(s, "cmd", None)]
            graph = repo.index.graph  # edges: stage -> a stage it depends on
            deps = {s.name: [d.name for d in graph.successors(s) if getattr(d, "cmd", None)]
                    for s in stages}
            specs = {s.name: _stage_spec(s, deps[s.name]) for s in stages}
    except DvcException as exc:
        raise CapfiltError(f"{root / 'dvc.yaml'}: DVC cannot read the pipeline: {exc}") from None
    return _toposort(specs, [s.name for s in stages])


def _toposort(specs: dict[str, StageSpec], order: list[str]) -> list[StageSpec]:
    done: list[str] = []
    pending = list(order)
    while pending:
        ready = [n for n in pending if all(u in done for u in specs[n].upstream)]
        if not ready:
            raise CapfiltError(f"dvc.yaml: stages form a cycle: {', '.join(pending)}")
        done.append(ready[0])
        pending.remove(ready[0])
    return [specs[n] for n in done]


def select(stages: list[StageSpec], names: list[str]) -> list[StageSpec]:
    """The stages named (DVC or `capfilt stage` names) in DAG order; [] = all."""
    if not names:
        return list(stages)
    known = {s.name: s for s in stages} | {s.alias: s for s in stages}
    unknown = [n for n in names if n not in known]
    if unknown:
        listed = ", ".join(s.name for s in stages)
        raise CapfiltError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml declares: {listed}")
    wanted = {known[n].name for n in names}
    return [s for s in stages if s.name in wanted]


def _dvc_argv() -> list[str]:
    exe = Path(sys.executable).with_name("dvc")
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("dvc")
    if found is None:
        raise CapfiltError("dvc not found next to this Python or on PATH; run `make setup` first")
    return [found]


def subprocess_env() -> dict[str, str]:
    """The environment for DVC and stage commands: this virtualenv's bin first on PATH, quiet."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run_dvc(root: Path, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run `dvc ARGS` in `root`; a non-zero exit is a CapfiltError with the output's tail."""
    argv = _dvc_argv() + args
    proc = children.run(argv, cwd=root, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-_TAIL_CHARS:]
        raise CapfiltError(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")
    return proc


def changed_stages(root: Path) -> set[str]:
    """Names of stages `dvc status` reports as changed (deps, outs, params or command)."""
    proc = run_dvc(root, ["status", "--json"])
    text = proc.stdout.strip()
    try:
        status = json.loads(text) if text else {}
    except json.JSONDecodeError:
        raise CapfiltError(f"`dvc status --json` printed no JSON: {text[:300]}") from None
    return {name.split(":")[-1] for name in status}


@dataclass(frozen=True)
class ReproResult:
    ran: bool  # False: DVC found nothing changed and skipped it
    output: str  # the command's stdout + stderr


def repro(root: Path, name: str, force: bool = False) -> ReproResult:
    """`dvc repro --single-item NAME` (with `--force` when asked)."""
    args = ["repro", "--single-item", name] + (["--force"] if force else [])
    proc = run_dvc(root, args)
    output = proc.stdout + proc.stderr
    skipped = name in _SKIPPED.findall(output)
    ran = name in _RAN.findall(output) or not skipped
    return ReproResult(ran=ran, output=output)


# --- data versions -------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, or "" when it does not exist."""
    if not path.is_file():
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_md5(root: Path, dvc_file: str = "data.dvc") -> str:
    """The md5 of the first output pinned by a `.dvc` file, or "" when there is none."""
    path = root / dvc_file
    if not path.is_file():
        return ""
    try:
        outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    except yaml.YAMLError as exc:
        raise CapfiltError(f"{path}: not valid YAML: {exc}") from None
    return str(outs[0].get("md5", "")) if outs else ""


def git_commit(root: Path) -> tuple[str, bool]:
    """(HEAD commit or "", whether tracked files differ from it)."""
    git = shutil.which("git")
    if git is None:
        return "", False
    head = subprocess.run([git, "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    if head.returncode != 0:
        return "", False
    dirty = subprocess.run([git, "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=False)
    return head.stdout.strip(), bool(dirty.stdout.strip())


def data_versions(root: Path) -> dict[str, str]:
    """The tags that pin a run's data: git commit, data.dvc md5, dvc.lock sha256."""
    commit, dirty = git_commit(root)
    return {"git_commit": commit, "git_dirty": str(dirty).lower(), "data_md5": data_md5(root),
            "dvc_lock_sha256": file_sha256(root / "dvc.lock")}
