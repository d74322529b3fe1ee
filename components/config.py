"""The typed schema of `params.yaml` and its one loader.

`params.yaml` is the single source of parameters. Each top-level section maps to one frozen
pydantic model below; `load_params` validates the whole file at once, rejects unknown keys and
wrong types with a message that names the file and the dotted key, and returns a `Params`
object whose sections are handed to the stages (`run(cfg.synth, ...)`). Names here are the
names in `params.yaml`, in `dvc.yaml` `params:` lists and in MLflow params.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import CapfiltError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base of every params section: frozen, unknown keys are an error, no silent coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- synth: the embedded corpus -------------------------------------------------------------


class NoiseMix(Section):
    """Proportions of the web texts by kind; they must sum to 1."""

    correct: float = Field(0.45, ge=0, le=1)  # a true, usually partial, description
    wrong_attribute: float = Field(0.10, ge=0, le=1)  # one attribute swapped (colour, shape, ...)
    other_image: float = Field(0.25, ge=0, le=1)  # the alt-text of another image
    junk: float = Field(0.20, ge=0, le=1)  # file names, shop phrases, boilerplate

    @model_validator(mode="after")
    def _sums_to_one(self) -> NoiseMix:
        total = self.correct + self.wrong_attribute + self.other_image + self.junk
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"noise proportions must sum to 1, got {total:.4f}")
        return self


class SynthConfig(Section):
    """The procedural image-text world (see components/synth.py for the design)."""

    seed: int = 0
    image_size: int = Field(64, ge=16, le=1024)
    n_human: int = Field(1000, ge=1)  # images in the human (COCO-style) set
    captions_per_image: int = Field(5, ge=1, le=20)
    n_web: int = Field(4000, ge=1)  # images in the noisy web set, one text each
    n_test: int = Field(300, ge=1)  # held-out images with reference captions
    max_objects: int = Field(3, ge=1, le=6)
    noise: NoiseMix = NoiseMix()


# --- the root ---------------------------------------------------------------------------------


class Params(Section):
    """All of params.yaml. A missing section takes its defaults; an unknown one is an error."""

    synth: SynthConfig = SynthConfig()


def _format_error(path: Path, err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{path}: {key}: unknown key"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{path}: {key}: {err['msg']} (got {shown})"


def parse_params(raw: dict[str, Any], path: Path = DEFAULT_PARAMS) -> Params:
    """Validate an already-parsed params mapping; `path` only names the source in errors."""
    if not isinstance(raw, dict):
        raise CapfiltError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(path, e) for e in exc.errors()]
        raise CapfiltError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with `section.key=value` overrides applied (values parsed as YAML)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise CapfiltError(f"override {item!r}: expected KEY=VALUE, e.g. synth.n_web=500")
        dotted, value = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CapfiltError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(value)
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def read_raw(path: Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The raw mapping in a params file; a missing or malformed file is a CapfiltError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CapfiltError(f"{path}: parameters file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CapfiltError(f"{path}: not valid YAML: {exc}") from None
    return raw or {}


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    """Load, override and validate a params file into a frozen `Params`."""
    path = Path(path)
    raw = read_raw(path)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_params(raw, path)

