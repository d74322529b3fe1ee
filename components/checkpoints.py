"""Checkpoints: DeepSpeed's for resuming a run, and the exported model directory for everything else.

Resume checkpoints live in a stage's resume folder, one tag directory per saved step. A save goes
into a hidden temporary tag, every rank adds its own small state file (RNG states, data position),
and only when all ranks are done does rank 0 rename the tag into place and then replace the
`latest` pointer file with `os.replace`; a run killed half-way leaves at most a temporary tag,
which is never read and is removed on the next start. A `run.json` fingerprint of the run's
parameters keeps a changed configuration from resuming a stale run. The exported model directory
(`config.json` + `model.safetensors` + tokenizer files) is what later stages load: no pickle,
tied tensors stored once with their aliases in the safetensors metadata, and loading names every
missing or unexpected key instead of skipping it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from components import atomic
from components.errors import CapfiltError

log = logging.getLogger(__name__)

LATEST = "latest"
RUN_FILE = "run.json"
_TMP_PREFIX = ".tmp-"
_MODEL_FILES = ("config.json", "model.safetensors")
M = TypeVar("M", bound=nn.Module)


def tag_for(step: int) -> str:
    """The tag directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step{step:08d}"


def rank_state_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rank{rank:03d}_state.pt"


def prepare_resume_dir(resume_dir: Path, fingerprint: str, resume: bool) -> str | None:
    """Rank 0: clean leftovers, drop a stale or unwanted run, and return the tag to resume or None."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    for leftover in resume_dir.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a save that never completed
    run_file = resume_dir / RUN_FILE
    same_run = run_file.is_file() and json.loads(run_file.read_text())["fingerprint"] == fingerprint
    if not (resume and same_run):
        if run_file.is_file():
            log.info("resume folder %s holds another run's checkpoints; starting afresh", resume_dir)
        for child in resume_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        atomic.write_text(run_file, json.dumps({"fingerprint": fingerprint}))
        return None
    return latest_tag(resume_dir)


def latest_tag(resume_dir: Path) -> str | None:
    """The tag named by the `latest` pointer, if it and its directory exist."""
    pointer = resume_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (resume_dir / tag).is_dir() else None


def clear_resume_dir(resume_dir: Path) -> None:
    """Remove a finished run's resume checkpoints: its exported model is the result now, and a
    later run (changed code, same params) must not pick them up."""
    shutil.rmtree(resume_dir, ignore_errors=True)


def temp_tag(step: int) -> str:
    """Where every rank writes a checkpoint before it is complete."""
    return _TMP_PREFIX + tag_for(step)


def publish(resume_dir: Path, step: int, keep: int) -> None:
    """Rank 0, after every rank finished writing: move the temp tag into place, point `latest` at
    it, then delete all but the newest `keep` complete checkpoints."""
    final = resume_dir / tag_for(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(resume_dir / temp_tag(step), final)
    atomic.write_text(resume_dir / LATEST, final.name)
    complete = sorted(p for p in resume_dir.glob("step*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_rank_state(path: Path, state: Mapping[str, Any]) -> None:
    """One rank's RNG states and data position (tensors, numbers, lists, strings only)."""
    tmp = path.with_name(path.name + ".part")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_rank_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CapfiltError(f"{path}: missing; the checkpoint was written by a different number of ranks")
    return torch.load(path, weights_only=True)


# --- the exported model directory ---------------------------------------------------------------


def _config_dict(model_config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        return dataclasses.asdict(model_config)
    if hasattr(model_config, "model_dump"):
        return model_config.model_dump()
    if isinstance(model_config, Mapping):
        return dict(model_config)
    raise TypeError(f"cannot serialise a model config of type {type(model_config).__name__}")


def _dedup(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared storage once: returns (tensors, {alias: stored name})."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_key: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in by_key:
            aliases[name] = by_key[key]
            continue
        by_key[key] = name
        kept[name] = t.detach().to("cpu", copy=True).contiguous()
    return kept, aliases


def save_model_dir(
    directory: Path | str,
    model: nn.Module,
    model_config: Any,
    tokenizer_dir: Path | str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `config.json`, `model.safetensors` (floating tensors as fp32) and the tokenizer files
    into `directory`, atomically. `state_dict` overrides `model.state_dict()` (e.g. ZeRO-3 gathered)."""
    directory = Path(directory)
    state = dict(state_dict if state_dict is not None else model.state_dict())
    tensors, aliases = _dedup(state)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        meta = {"format": "pt", "aliases": json.dumps(aliases, sort_keys=True)}
        save_file(tensors, tmp / "model.safetensors", metadata=meta)
        config = {"class": type(model).__name__, "model": _config_dict(model_config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:  # a tokenizer folder, or another exported model directory
            for f in sorted(Path(tokenizer_dir).iterdir()):
                if f.is_file() and f.name not in _MODEL_FILES and not f.name.startswith("."):
                    shutil.copy2(f, tmp / f.name)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_model_config(directory: Path | str) -> dict[str, Any]:
    """The `model` part of an exported directory's config.json."""
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())["model"]
    except FileNotFoundError:
        raise CapfiltError(f"{path}: not found; is {directory} an exported model directory?") from None
    except (json.JSONDecodeError, KeyError) as exc:
        raise CapfiltError(f"{path}: not a capfilt model config ({exc})") from None


def read_state_dict(directory: Path | str) -> dict[str, torch.Tensor]:
    """The full state dict of an exported directory, aliases expanded."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise CapfiltError(f"{path}: not found")
    try:
        state = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise CapfiltError(f"{path}: unreadable safetensors file ({exc})") from None
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load `state` into `model`; any missing, unexpected or mis-shaped key is a CapfiltError,
    except keys the model lists in `optional_state_keys` (newer buffers; they keep their initial
    values when an older checkpoint lacks them)."""
    own = model.state_dict()
    absent = set(own) - set(state)
    missing = sorted(absent - set(getattr(model, "optional_state_keys", ())))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise CapfiltError(f"{source}: does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(dict(state), strict=not absent)  # absent: only optional keys by now


def load_model_dir(directory: Path | str, cls: Callable[..., M] | type[M]) -> M:
    """Build a `cls` from the directory's config (a BLIP class gets a `models.config.BlipConfig`;
    a class with `from_config_dict` builds itself) and load the weights strictly."""
    config = read_model_config(directory)
    builder = getattr(cls, "from_config_dict", None)
    if builder is not None:
        model = builder(config)
    else:
        from models.config import from_dict

        try:
            model = cls(from_dict(config))
        except ValueError as exc:
            raise CapfiltError(f"{Path(directory) / 'config.json'}: {exc}") from None
    load_state_strict(model, read_state_dict(directory), str(Path(directory)))
    return model


