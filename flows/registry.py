"""The model registry: log exported models as pyfunc, register them, and move `champion`.

Each model named under `tracking.models` whose directory exists is logged as an MLflow pyfunc
(`flows.pyfunc`; signature: encoded image bytes in, captions or match scores out) inside a
`promote` child run of the pipeline run, and registered under its name (`capfilt-captioner`,
`capfilt-filter`, `capfilt-blip`). Its promotion metric (a dotted key of
`promote.metrics_file`) is stored as a version tag. `champion` moves to the new version only if it
beats the current champion's metric by `promote.margin`; the old champion becomes `previous`.
`promote_version` does the same move by hand (`capfilt promote MODEL VERSION`).
"""

from __future__ import annotations

import json
import logging
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from components.config import Params, PromoteConfig, RegisteredModel
from components.errors import CapfiltError
from flows import tracking

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS = "previous"
METRIC_TAG = "promotion_metric"
VALUE_TAG = "promotion_value"
_REQUIREMENTS = ("torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors",
                 "pillow", "pandas", "numpy", "pydantic", "pyyaml", "mlflow")
_CODE = ("components", "models", "flows")
EXAMPLE_TEXT = "a grey square"


def signature(kind: str) -> Any:
    """images in; captions (captioner) or match scores (filter, blip) out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    if kind == "captioner":
        return ModelSignature(Schema([ColSpec("binary", "image")]), Schema([ColSpec("string", "caption")]))
    return ModelSignature(Schema([ColSpec("binary", "image"), ColSpec("string", "text")]),
                          Schema([ColSpec("double", "score")]))


def input_example(kind: str, image_size: int) -> Any:
    """One row the signature takes, cheap to score: a solid grey PNG of the model's image size
    (and, for the matching models, a short text)."""
    import io

    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (128, 128, 128)).save(buf, format="PNG")
    row: dict[str, list[Any]] = {"image": [buf.getvalue()]}
    if kind != "captioner":
        row["text"] = [EXAMPLE_TEXT]
    return pd.DataFrame(row)


def _requirements() -> list[str]:
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def log_model(model_dir: Path, spec: RegisteredModel, options: dict[str, Any]) -> str:
    """Log `model_dir` as a pyfunc in the active run, with a one-row input example (MLflow scores
    it once at log time to check the model serves); returns the model URI."""
    import mlflow

    from components.checkpoints import read_model_config
    from flows.pyfunc import CaptionerModel, MatchModel

    python_model = CaptionerModel() if spec.kind == "captioner" else MatchModel(spec.kind)
    code_root = Path(__file__).resolve().parents[1]
    image_size = int(read_model_config(model_dir)["vision"]["image_size"])
    with warnings.catch_warnings():  # MLflow 3.17 compares the example's columns with a range (pandas 3)
        warnings.filterwarnings("ignore", "Operation with range is deprecated", module="mlflow")
        info = mlflow.pyfunc.log_model(
            name=spec.kind, python_model=python_model, artifacts={"model_dir": str(model_dir)},
            signature=signature(spec.kind), input_example=input_example(spec.kind, image_size),
            model_config=options, pip_requirements=_requirements(), code_paths=[str(code_root / c) for c in _CODE])
    return info.model_uri


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` under `name`; returns the new version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    version = mlflow.register_model(model_uri, name).version
    for key, value in tags.items():
        MlflowClient().set_model_version_tag(name, version, key, value)
    return str(version)


def champion_version(name: str) -> str | None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def promote_version(name: str, version: str) -> str:
    """Point `champion` at `version` (the old champion becomes `previous`); returns a message."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise CapfiltError(f"model {name!r} has no version {version!r} in {tracking.current_uri()}") from None
    old = champion_version(name)
    if old == str(version):
        return f"{name} v{version} is already {CHAMPION}"
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return f"{name}: {CHAMPION} -> v{version}" + (f" ({PREVIOUS}: v{old})" if old else "")


def _version_value(name: str, version: str) -> float | None:
    from mlflow.tracking import MlflowClient

    raw = MlflowClient().get_model_version(name, version).tags.get(VALUE_TAG)
    return float(raw) if raw not in (None, "") else None


def decide(new: float | None, current: float | None, cfg: PromoteConfig) -> bool:
    """Whether a version with metric `new` replaces a champion with metric `current`."""
    if new is None:
        return False
    if current is None:
        return True
    gain = new - current if cfg.higher_is_better else current - new
    return gain > cfg.margin


def maybe_promote(name: str, version: str, value: float | None, cfg: PromoteConfig) -> dict[str, Any]:
    """Promote when the first version or better than the champion by the margin."""
    old = champion_version(name)
    current = _version_value(name, old) if old else None
    if old is not None and value is None:
        return {"model": name, "version": version, "promoted": False,
                "message": f"{name} v{version}: no promotion metric; {CHAMPION} stays v{old}"}
    if old is None or decide(value, current, cfg):
        return {"model": name, "version": version, "promoted": True, "message": promote_version(name, version)}
    return {"model": name, "version": version, "promoted": False,
            "message": f"{name} v{version}: {value} does not beat {CHAMPION} v{old} ({current}) "
                       f"by {cfg.margin}; {CHAMPION} unchanged"}


def metric_value(metrics_file: Path, key: str) -> float | None:
    """A dotted key of the evaluate metrics, or None when the file or key is absent."""
    if not key or not metrics_file.is_file():
        return None
    try:
        value = tracking.pick(json.loads(metrics_file.read_text()), key)
    except (KeyError, TypeError, json.JSONDecodeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def register_all(root: Path, params: Params, parent_run_id: str) -> list[dict[str, Any]]:
    """Log, register and maybe promote every configured model whose directory exists."""
    import mlflow

    present = {n: m for n, m in params.tracking.models.items() if (root / m.dir / "config.json").is_file()}
    if not present:
        return []
    exp_id = tracking.experiment_id(root, params.tracking.experiment)
    run_id = tracking.start_run(exp_id, "promote", {"stage": "promote"}, parent=parent_run_id)
    results = []
    with mlflow.start_run(run_id=run_id):
        for name, spec in present.items():
            value = metric_value(root / params.promote.metrics_file, spec.metric)
            options = {"prompt": params.finetune.captioner.prompt, "max_words": params.finetune.filter.text.max_words}
            uri = log_model(root / spec.dir, spec, options)
            tags = {"kind": spec.kind, "source_dir": spec.dir, "pipeline_run_id": parent_run_id,
                    METRIC_TAG: spec.metric, VALUE_TAG: "" if value is None else repr(value)}
            version = register(uri, name, tags)
            results.append(maybe_promote(name, version, value, params.promote))
            log.info("%s", results[-1]["message"])
    return results
