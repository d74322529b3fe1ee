"""MLflow pyfunc wrappers: an exported capfilt model directory behind `model.predict(DataFrame)`.

`CaptionerModel` takes a column `image` of encoded image bytes (PNG, JPEG, WebP) and returns a
column `caption` (beam search from the model's `prompt`, prompt removed). `MatchModel` (the filter
and the pre-trained MED) takes `image` and `text` and returns `score`, the ITM match probability.
The model directory travels as the pyfunc's `model_dir` artifact, so a registered version loads
anywhere with `mlflow.pyfunc.load_model("models:/capfilt-captioner@champion")`; weights are read
with `components.checkpoints.load_model_dir` (safetensors, no pickle).
"""

from __future__ import annotations

import io
from typing import Any

import mlflow.pyfunc
import pandas as pd

MODEL_CLASSES = {"captioner": "BlipCaptioner", "filter": "BlipFilter", "blip": "BlipPretrain"}


def _model_class(kind: str) -> type:
    from models import blip, blip_filter, blip_pretrain

    classes = {"captioner": blip.BlipCaptioner, "filter": blip_filter.BlipFilter,
               "blip": blip_pretrain.BlipPretrain}
    return classes[kind]


class _CapfiltModel(mlflow.pyfunc.PythonModel):
    """Shared loading: model, tokenizer and eval transform from the `model_dir` artifact."""

    kind = ""

    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from components.checkpoints import load_model_dir
        from components.config import AugmentConfig
        from components.data import build_transform
        from components.tokenizer import load_tokenizer

        folder = Path(context.artifacts["model_dir"])
        self.model = load_model_dir(folder, _model_class(self.kind)).eval()
        self.tokenizer = load_tokenizer(folder)
        self.transform = build_transform(self.model.config.vision.image_size, AugmentConfig())
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
        return torch.stack(tensors)  # (B, 3, H, W)


class CaptionerModel(_CapfiltModel):
    """image bytes -> caption."""

    kind = "captioner"

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from models.generation import GenerationConfig, decode_batch, generate

        images = self._images(model_input["image"])
        text = self.model.config.text
        prompt = self.options.get("prompt", "a picture of ")
        ids = self.tokenizer.encode(prompt).ids[:-1]  # [CLS] prompt (no [SEP])
        ids[0] = text.bos_token_id  # the decoder starts from [DEC]
        prompt_ids = torch.tensor([ids] * images.shape[0], dtype=torch.long)  # (B, T)
        cfg = GenerationConfig(decoding="beam", num_beams=int(self.options.get("num_beams", 3)),
                               max_new_tokens=int(self.options.get("max_new_tokens", 20)),
                               eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
        with torch.no_grad():
            out = generate(self.model.step_decoder(), prompt_ids, self.model.encode_image(images), cfg)
        rows = decode_batch(out.new_tokens, text.sep_token_id, text.pad_token_id)
        captions = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
        return pd.DataFrame({"caption": captions})


class MatchModel(_CapfiltModel):
    """(image bytes, text) -> ITM match probability. `kind` is filter or blip."""

    def __init__(self, kind: str = "filter") -> None:
        self.kind = kind

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from components.text import pre_caption

        images = self._images(model_input["image"])
        max_words = int(self.options.get("max_words", 30))
        texts = [torch.tensor(self.tokenizer.encode(pre_caption(str(t), max_words)).ids, dtype=torch.long)
                 for t in model_input["text"]]
        with torch.no_grad():
            embeds = self.model.encode_image(images)  # (B, 1+N, Dv)
            scores = self.model.itm_scores(embeds, texts, None, torch.arange(len(texts)))
        return pd.DataFrame({"score": scores.double().numpy()})
