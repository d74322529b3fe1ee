"""The training stages agree across dvc.yaml, params.yaml, the config schema and the stage table."""

from __future__ import annotations

from pathlib import Path

import yaml

from components.config import load_params
from components.stages import STAGES, TRAINING_STAGES

ROOT = Path(__file__).resolve().parents[2]
DVC_TRAINING = ("pretrain", "finetune", "retrain", "finetune2")


def _expanded(name: str, stage: dict) -> list[tuple[str, dict]]:
    if "foreach" not in stage:
        return [(name, stage)]
    text = yaml.safe_dump(stage["do"])
    return [(f"{name}@{item}", yaml.safe_load(text.replace("${item}", item))) for item in stage["foreach"]]


def test_dvc_training_stages_call_known_stages_with_existing_params():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    params = load_params(ROOT / "params.yaml").model_dump()
    called = set()
    for name in DVC_TRAINING:
        for full, stage in _expanded(name, dvc[name]):
            cmd = stage["cmd"].split()
            assert cmd[:3] == ["capfilt", "stage", cmd[2]] and cmd[2] in STAGES, full
            called.add(cmd[2])
            for dotted in stage["params"]:
                node = params
                for key in dotted.split("."):
                    assert isinstance(node, dict) and key in node, f"{full}: params {dotted}"
                    node = node[key]
            assert all(str(out).startswith("outputs/") for out in stage["outs"]), full
    assert called == set(TRAINING_STAGES)


def test_default_training_params_are_consistent():
    p = load_params(ROOT / "params.yaml")
    assert not p.pretrain.augment.enabled and not p.retrain.augment.enabled  # positions in captions
    assert not p.finetune.captioner.augment.enabled and not p.finetune.filter.augment.enabled
    assert p.finetune.round1_init == f"{p.pretrain.out}/model"
    assert p.finetune.round2_init == f"{p.retrain.out}/model"
