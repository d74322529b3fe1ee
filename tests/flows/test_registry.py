"""Model registry: pyfunc logging with a signature and a scoring input example, registration,
champion promotion by metric and margin, `capfilt promote` by hand, and a promoted captioner that
loads by alias and captions."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from components.config import PromoteConfig, load_params
from components.errors import CapfiltError
from flows import registry, tracking

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "components"))
from train_corpus import draw, make_tokenizer  # noqa: E402

TINY = {"vision.image_size": 32, "vision.patch_size": 8, "vision.width": 64, "vision.depth": 2,
        "vision.heads": 2, "text.hidden_size": 64, "text.num_layers": 2, "text.num_heads": 2,
        "text.intermediate_size": 128, "text.max_position_embeddings": 48, "embed_dim": 32,
        "queue_size": 64}


def _export(folder: Path, kind: str, tok: Path) -> Path:
    """A random-weight tiny model of `kind`, exported like the training stages do."""
    import torch

    from components.checkpoints import save_model_dir
    from components.tokenizer import load_tokenizer
    from models.blip import BlipCaptioner, BlipFilter, BlipPretrain
    from models.config import resolve_config

    vocab = load_tokenizer(tok).get_vocab_size()
    config = resolve_config("tiny", {**TINY, "text.vocab_size": vocab + 1, "text.bos_token_id": vocab,
                                     "text.cls_token_id": 2, "text.sep_token_id": 3, "text.pad_token_id": 0,
                                     "text.enc_token_id": 6})
    cls = {"captioner": BlipCaptioner, "filter": BlipFilter, "blip": BlipPretrain}[kind]
    torch.manual_seed(0)
    return save_model_dir(folder, cls(config), config, tokenizer_dir=tok)


def _png() -> bytes:
    return draw("red", "left")


def test_decide_uses_margin_and_direction():
    cfg = PromoteConfig(margin=0.05)
    assert registry.decide(0.9, None, cfg) and not registry.decide(None, 0.1, cfg)
    assert registry.decide(0.9, 0.8, cfg) and not registry.decide(0.84, 0.8, cfg)
    assert registry.decide(0.7, 0.8, PromoteConfig(higher_is_better=False, margin=0.05))


@pytest.mark.slow
def test_register_promote_and_caption_from_champion(tmp_path, mlflow_store, monkeypatch):
    tok = make_tokenizer(tmp_path / "tok")
    for kind, rel in (("captioner", "outputs/finetune2/captioner/model"), ("filter", "outputs/finetune2/filter/model"),
                      ("blip", "outputs/retrain/model")):
        _export(tmp_path / rel, kind, tok)
    metrics = tmp_path / "outputs/evaluate/metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"round2": {"cider": 0.5}, "filter": {"auroc": 0.9}}))  # no i2t_r1
    params = load_params(Path(__file__).resolve().parents[2] / "params.yaml", ["promote.margin=0.1"])
    tracking.configure(tmp_path, params.tracking)
    exp = tracking.experiment_id(tmp_path, "reg-test")
    parent = tracking.start_run(exp, "pipeline", {})

    first = registry.register_all(tmp_path, params, parent)
    assert [(r["model"], r["version"], r["promoted"]) for r in first] == [
        ("capfilt-captioner", "1", True), ("capfilt-filter", "1", True), ("capfilt-blip", "1", True)]
    metrics.write_text(json.dumps({"round2": {"cider": 0.55}, "filter": {"auroc": 0.95}}))
    second = registry.register_all(tmp_path, params, parent)
    assert [r["promoted"] for r in second] == [False, False, False]  # +0.05 does not beat the 0.1 margin
    assert "no promotion metric" in second[2]["message"]  # and without a metric nothing moves
    assert "champion unchanged" in second[0]["message"]

    assert registry.promote_version("capfilt-captioner", "2") == "capfilt-captioner: champion -> v2 (previous: v1)"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("capfilt-captioner", "previous").version) == "1"
    with pytest.raises(CapfiltError, match="no version '9'"):
        registry.promote_version("capfilt-captioner", "9")

    model = mlflow.pyfunc.load_model("models:/capfilt-captioner@champion")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image"]
    # each version carries a one-row input example at the model's image size, and it scores
    for uri, columns, output in (("models:/capfilt-captioner@champion", ["image"], "caption"),
                                 ("models:/capfilt-filter@champion", ["image", "text"], "score"),
                                 ("models:/capfilt-blip@champion", ["image", "text"], "score")):
        logged = mlflow.pyfunc.load_model(uri)
        assert logged.metadata.saved_input_example_info["artifact_path"] == "input_example.json"
        example = logged.input_example
        assert list(example.columns) == columns and len(example) == 1
        assert Image.open(io.BytesIO(example.image[0])).size == (TINY["vision.image_size"],) * 2
        out = logged.predict(example)
        assert list(out.columns) == [output] and out.shape == (1, 1)
    out = model.predict(pd.DataFrame({"image": [_png(), _png()]}))
    assert list(out.columns) == ["caption"] and len(out) == 2 and all(isinstance(c, str) for c in out.caption)

    scorer = mlflow.pyfunc.load_model("models:/capfilt-filter@champion")
    scores = scorer.predict(pd.DataFrame({"image": [_png()], "text": ["a red square on the left"]}))
    assert 0.0 <= float(scores.score[0]) <= 1.0
    blip = mlflow.pyfunc.load_model("models:/capfilt-blip@champion")
    assert blip.metadata.get_input_schema().input_names() == ["image", "text"]
    assert len(blip.predict(pd.DataFrame({"image": [_png(), _png()], "text": ["a", "b"]}))) == 2
    with pytest.raises(Exception, match="row 0"):
        scorer.predict(pd.DataFrame({"image": [b"not an image"], "text": ["x"]}))
