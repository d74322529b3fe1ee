"""MLflow pyfunc wrappers: an exported capfilt model directory behind `model.predict(DataFrame)`.

`CaptionerModel` takes a column `image` of encoded image bytes (PNG, JPEG, WebP) and returns a
column `caption` (by default beam search from the model's `prompt`, prompt removed; any
`components.predict.CaptionOptions` field in the model config overrides its default).
`MatchModel` (the filter and the pre-trained MED) takes `image` and `text` and returns `score`,
the ITM match probability. Both run the inference path of the pipeline
(`components.batch_inference`: model loading, prompt ids, generation, tokenisation, ITM scoring)
in fp32, on a GPU when there is one. The model directory travels as the pyfunc's `model_dir`
artifact, so a registered version loads anywhere with
`mlflow.pyfunc.load_model("models:/capfilt-captioner@champion")`; weights are read with
`components.checkpoints.load_model_dir` (safetensors, no pickle).
"""

from __future__ import annotations

import io
from typing import Any

import mlflow.pyfunc
import pandas as pd


class _CapfiltModel(mlflow.pyfunc.PythonModel):
    """Shared loading: model, tokenizer and eval transform from the `model_dir` artifact."""

    kind = ""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from components import batch_inference as infer
        from components.config import AugmentConfig
        from components.data import build_transform

        load = infer.load_captioner if self.kind == "captioner" else infer.load_filter
        self.device = infer.device()
        self.loaded = load(Path(context.artifacts["model_dir"]), self.device)
        self.transform = build_transform(self.loaded.image_size, AugmentConfig(enabled=False))
        self.options = dict(context.model_config or {})

    def _images(self, column: pd.Series) -> Any:
        import torch
        from PIL import Image

        tensors = []
        for i, raw in enumerate(column):
            try:
                image = Image.open(io.BytesIO(bytes(raw))).convert("RGB")
            except Exception as exc:  # noqa: BLE001 - any decoder failure names the row
                raise ValueError(f"row {i}: `image` is not a readable image ({exc})") from None
            tensors.append(self.transform(image))
        return torch.stack(tensors).to(self.device)  # (B, 3, H, W)


class CaptionerModel(_CapfiltModel):
    """image bytes -> caption."""

    kind = "captioner"

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import dataclasses
        import hashlib

        import torch

        from components import batch_inference as infer
        from components.predict import CaptionOptions, generation_config

        fields = {f.name for f in dataclasses.fields(CaptionOptions)}
        options = CaptionOptions(**{k: v for k, v in self.options.items() if k in fields})
        images = self._images(model_input["image"])
        # nucleus draws from a generator per image, seeded by (seed, the image's bytes)
        seeds = [infer.image_seed(options.seed, hashlib.sha256(bytes(raw)).hexdigest())
                 for raw in model_input["image"]]
        with torch.inference_mode(), infer.autocast(self.device):
            captions = infer.caption(self.loaded, images, generation_config(self.loaded, options),
                                     options.prompt, seeds)
        return pd.DataFrame({"caption": captions})


class MatchModel(_CapfiltModel):
    """(image bytes, text) -> ITM match probability. `kind` is filter or blip."""

    def __init__(self, kind: str = "filter") -> None:
        self.kind = kind

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from components import batch_inference as infer
        from components.predict import MAX_WORDS, text_input

        images = self._images(model_input["image"])
        texts = [str(t) for t in model_input["text"]]
        cfg = text_input(self.loaded.model, int(self.options.get("max_words", MAX_WORDS)))
        with torch.inference_mode(), infer.autocast(self.device):
            itm, _ = infer.score_texts(self.loaded, images, texts, torch.arange(len(texts)), cfg)
        return pd.DataFrame({"score": pd.Series(itm, dtype="float64")})
