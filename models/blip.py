"""The BLIP models: `BlipPretrain`, `BlipCaptioner` (ViT + image-grounded decoder), `BlipFilter`.

`BlipCaptioner` is the CapFilt captioner: fine-tuned with the LM loss only, and driven by
`models.generation` through the `StepDecoder` protocol of its decoder (`step_decoder()`), which
caches the image cross-attention keys/values once per image and the prompt's self-attention.
The captioner and the filter are separate models, each constructible from a `BlipPretrain` state
dict (weights are copied, so the two fine-tunes never share parameters). Forward passes take
tensors only; the first-token swap ([CLS] -> [DEC]) happens inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from models.blip_base import load_subset, with_first_token
from models.blip_filter import BlipFilter, FilterOutput
from models.blip_pretrain import BlipPretrain, PretrainOutput
from models.config import BlipConfig
from models.generation import StepDecoder
from models.losses import lm_labels, lm_loss
from models.med import TextDecoder
from models.vit import build_vit

__all__ = ["BlipCaptioner", "BlipFilter", "BlipPretrain", "CaptionerOutput", "FilterOutput",
           "PretrainOutput", "count_parameters"]


@dataclass(frozen=True)
class CaptionerOutput:
    """Loss of one captioner fine-tuning step (LM only)."""

    loss: Tensor
    loss_lm: Tensor


class BlipCaptioner(nn.Module):
    """`visual_encoder` + `text_decoder` (BLIP's `BLIP_Decoder` layout)."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        self.visual_encoder = build_vit(config.vision)
        self.text_decoder = TextDecoder(config.text, config.vision.width)

    @classmethod
    def from_pretrain_state_dict(cls, config: BlipConfig, state_dict: Mapping[str, Tensor]) -> BlipCaptioner:
        """A captioner initialised from a `BlipPretrain` state dict (`visual_encoder.*`, `text_decoder.*`)."""
        model = cls(config)
        load_subset(model, state_dict, may_miss=set())
        return model

    def encode_image(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) -> ViT tokens (B, 1+N, Dv)."""
        return self.visual_encoder(image)

    def decoder_logits(self, input_ids: Tensor, attention_mask: Tensor | None, image_embeds: Tensor) -> Tensor:
        """No-cache causal pass: input_ids (B, T) as given ([DEC] at 0) -> logits (B, T, V)."""
        return self.text_decoder(input_ids, attention_mask, image_embeds=image_embeds)

    def step_decoder(self) -> StepDecoder:
        """The KV-cached decoder for `models.generation` (prefill / step / reorder)."""
        return self.text_decoder

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                prompt_length: int = 0) -> CaptionerOutput:
        """LM loss: input_ids (B, T) `[CLS] prompt caption [SEP] [PAD]...`; the first
        `prompt_length` positions ([DEC] + prompt) are not predicted."""
        image_embeds = self.visual_encoder(image)  # (B, 1+N, Dv)
        dec_ids = with_first_token(input_ids, self.config.text.bos_token_id)
        logits = self.text_decoder(dec_ids, attention_mask, image_embeds=image_embeds)
        labels = lm_labels(dec_ids, attention_mask, prompt_length)
        loss = lm_loss(logits, labels, self.config.label_smoothing)
        return CaptionerOutput(loss, loss)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied/shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
