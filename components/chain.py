"""The pipeline's stages re-run on other inputs: the ablation's variants, the extra bootstrap
rounds and the training draws.

A chain calls the stages themselves — `capfilt stage bootstrap | retrain | finetune2-captioner |
finetune2-filter`, or round 1's `pretrain | finetune-captioner | finetune-filter` — as
subprocesses, so several ranks through the deepspeed launcher work as in the pipeline — with
`--set` overrides of their input, output and resume paths only. The parameters the calling stage
was given (or a copy it changed, e.g. the draws' seed) are written once to `<root>/params.yaml`
and every subprocess reads that file, so every other parameter is the pipeline's. A chain
resumes: a step whose result exists (an exported model, a bootstrap metrics.json) is skipped, and
a training step killed mid-way continues from its checkpoints under `resume`. `<root>/chain.json`
records what the chain was built from (the params sections it uses, the digests of its input
files and of the training code); when any of that changed, the chain's old outputs are deleted
first, so a skipped step never belongs to other inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components import atomic, children
from components.config import Params
from components.errors import CapfiltError

log = logging.getLogger(__name__)

# What a chain's models depend on besides params and data: the code of the stages it runs (as the
# deps of the bootstrap, retrain and finetune2 stages in dvc.yaml), plus everything in models/.
STAGE_CODE = ("train_stages.py", "train.py", "train_state.py", "optim.py", "checkpoints.py",
              "distributed.py", "data.py", "bootstrap.py", "bootstrap_merge.py", "batch_inference.py",
              "model_io.py", "schemas.py", "expectations.py", "chain.py")
TRAINING_SECTIONS = ("model", "train", "retrain", "finetune")


@dataclass(frozen=True)
class Chain:
    """Where one chain's outputs go (`root`) and its training checkpoints (`resume`)."""

    root: Path
    resume: Path

    @property
    def params_file(self) -> Path:
        return self.root / "params.yaml"

    @property
    def bootstrap(self) -> Path:
        return self.root / "bootstrap"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def retrain(self) -> Path:
        return self.root / "retrain"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    def model(self, task: str) -> Path:
        """The exported fine-tuned `captioner` or `filter` of this chain."""
        return self.finetune / task / "model"


def _hash_path(h: Any, path: Path) -> None:
    if not path.exists():
        raise CapfiltError(f"{path}: input not found; run the stages before this one")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(path.parent).parts):
            continue  # temporary or hidden files
        h.update(str(f.relative_to(path.parent)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)


def code_paths() -> list[Path]:
    """The source files in STAGE_CODE and models/ (what a chain's results depend on)."""
    here = Path(__file__).resolve().parent
    models = here.parent / "models"
    return [here / name for name in STAGE_CODE] + sorted(models.rglob("*.py"))


def chain_key(settings: Mapping[str, Any], inputs: list[Path]) -> str:
    """A digest of the settings, the input files (or folders) and the stage code."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in [*inputs, *code_paths()]:
        _hash_path(h, Path(path))
    return h.hexdigest()[:16]


def open_chain(params: Params, root: Path, resume: Path, settings: Mapping[str, Any],
               inputs: list[Path]) -> Chain:
    """Prepare `root` for a chain: drop outputs of other inputs, write params.yaml and chain.json."""
    chain = Chain(Path(root), Path(resume))
    inputs = list(dict.fromkeys(Path(p) for p in inputs))  # e.g. the human manifest named twice
    key = chain_key(settings, inputs)
    record = chain.root / "chain.json"
    if record.is_file() and json.loads(record.read_text()).get("key") != key:
        log.info("%s: inputs, params or code changed since its outputs were made; starting afresh", root)
        shutil.rmtree(chain.root)
    chain.root.mkdir(parents=True, exist_ok=True)
    atomic.write_text(chain.params_file, yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    atomic.write_json(record, {"key": key, "inputs": [str(p) for p in inputs]})
    return chain


def run_stage_process(name: str, chain: Chain, overrides: Mapping[str, Any]) -> None:
    """`capfilt stage NAME --params <root>/params.yaml --set key=value ...` in a subprocess.

    Values go as JSON (valid YAML), so a list of paths stays a list and no path is re-typed."""
    argv = [sys.executable, "-m", "components.cli", "stage", name, "--params", str(chain.params_file)]
    argv += [a for key, value in overrides.items() for a in ("--set", f"{key}={json.dumps(value)}")]
    log.info("%s: %s", chain.root, " ".join(argv[2:]))
    proc = children.run(argv)
    if proc.returncode != 0:
        raise CapfiltError(f"{chain.root}: `capfilt stage {name}` failed (exit code {proc.returncode}); "
                           "see its messages above, then run this stage again: finished steps are kept")


def bootstrap_step(chain: Chain, captioner: Path, filter_dir: Path) -> Path:
    """Bootstrap the web corpus with the given models into `<root>/bootstrap`; its manifest."""
    if not (chain.bootstrap / "metrics.json").is_file():  # metrics.json is written last
        run_stage_process("bootstrap", chain, {"bootstrap.captioner": str(captioner),
                                               "bootstrap.filter": str(filter_dir),
                                               "bootstrap.out": str(chain.bootstrap)})
    return chain.bootstrap / "manifest.parquet"


def _finetune_steps(chain: Chain, round_: int, init: Path) -> tuple[Path, Path]:
    """Both fine-tunes of `round_` (1: finetune-*, 2: finetune2-*) from `init`; (captioner, filter) dirs."""
    stage, key = ("finetune", "round1") if round_ == 1 else ("finetune2", "round2")
    for task in ("captioner", "filter"):
        if not (chain.model(task) / "config.json").is_file():  # exported atomically, last
            run_stage_process(f"{stage}-{task}", chain, {f"finetune.{key}_init": str(init),
                                                         f"finetune.{key}_out": str(chain.finetune),
                                                         "finetune.resume_dir": str(chain.resume)})
    return chain.model("captioner"), chain.model("filter")


def pretrain_chain(chain: Chain) -> tuple[Path, Path]:
    """Round 1's training on `pretrain.manifests`: pretrain, then both fine-tunes; (captioner, filter) dirs."""
    if not (chain.pretrain / "model" / "config.json").is_file():
        run_stage_process("pretrain", chain, {"pretrain.out": str(chain.pretrain),
                                              "pretrain.resume_dir": str(chain.resume / "pretrain")})
    return _finetune_steps(chain, 1, chain.pretrain / "model")


def train_chain(chain: Chain, manifests: list[Path]) -> tuple[Path, Path]:
    """Round 2's training on `manifests`: retrain, then both fine-tunes; (captioner, filter) dirs."""
    if not (chain.retrain / "model" / "config.json").is_file():  # exported atomically, last
        run_stage_process("retrain", chain, {"retrain.manifests": [str(m) for m in manifests],
                                             "retrain.out": str(chain.retrain),
                                             "retrain.resume_dir": str(chain.resume / "retrain")})
    return _finetune_steps(chain, 2, chain.retrain / "model")


def sections(params: Params, names: tuple[str, ...],
             drop: Mapping[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The named params sections as plain data, without the keys in `drop` (section -> keys)."""
    dumped = params.model_dump(mode="json")
    out = {name: dumped[name] for name in names}
    for name, keys in (drop or {}).items():
        out[name] = {k: v for k, v in out[name].items() if k not in keys}
    return out
