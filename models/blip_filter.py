"""`BlipFilter`: the image-text matching model (CapFilt's filter, retrieval fine-tuning).

The encoder side of BLIP (ViT, text encoder, projections, ITM head, momentum copies, queues)
plus `idx_queue`, the image ids of the queued features, so that every caption of the same image
(in the batch or in the queue) is an ITC positive and is never drawn as an ITM negative. The
fine-tune loss is ITC + ITM. At inference `itm_scores` / `itm_logits` / `itc_similarity` score
texts against images encoded once. Built fresh or from a `BlipPretrain` state dict (copied
weights, nothing tied to the source; the queue pointer starts at 0, as BLIP's retrieval model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.blip_base import BlipEncoderBase, load_subset, with_first_token
from models.config import BlipConfig
from models.losses import dequeue_and_enqueue, image_id_targets, itc_loss


@dataclass(frozen=True)
class FilterOutput:
    """Losses of one filter fine-tuning step; `loss` = itc + itm."""

    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    itm_accuracy: Tensor  # detached


class BlipFilter(BlipEncoderBase):
    """ITC + ITM model with image-id positives."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self._build_momentum()
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))

    @classmethod
    def from_pretrain_state_dict(cls, config: BlipConfig, state_dict: Mapping[str, Tensor]) -> BlipFilter:
        """A filter initialised from a `BlipPretrain` state dict (encoder side, momentum, queues)."""
        model = cls(config)
        # A pre-training id queue names images of another corpus: the filter starts its own (-100).
        state_dict = {k: v for k, v in state_dict.items() if k != "idx_queue"}
        load_subset(model, state_dict, may_miss={"idx_queue", "ptr_queue", "image_queue", "text_queue"})
        return model

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, image_ids: Tensor,
                alpha: float, generator: torch.Generator | None = None,
                negatives: tuple[Tensor, Tensor, Tensor] | None = None) -> FilterOutput:
        """image (B, 3, H, W); input_ids (B, T) `[CLS] ...`; attention_mask (B, T); image_ids (B,).

        `negatives` = (ids (B, T), mask (B, T), valid (B,) bool): extra ITM negative texts, row i
        matched against image i where valid (word-swap negatives; only ITM sees them).
        """
        cfg = self.config.text
        if self.momentum_in_forward:
            self.momentum_step()  # temperature clamp + EMA before this step's momentum forward
        image_embeds = self.visual_encoder(image)  # (B, 1+N, Dv)
        image_feat = self.image_features(image_embeds)
        text_ids = with_first_token(input_ids, cfg.cls_token_id)
        text_hidden = self.text_encoder(text_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

        image_feat_m, text_feat_m = self.momentum_features(image, text_ids, attention_mask)
        image_ids = image_ids.view(-1).to(device=image.device, dtype=torch.long)
        targets = image_id_targets(image_ids, self.idx_queue)
        # A copy of temp: autograd then keeps no reference to the parameter, which ZeRO-3 frees
        # after forward (it cannot hook this dataclass output to fetch it back for backward).
        loss_itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                            self.text_queue, self.temp.clone(), alpha, targets)
        dequeue_and_enqueue(self.ptr_queue, [(self.image_queue, self.gather(image_feat_m)),
                                             (self.text_queue, self.gather(text_feat_m)),
                                             (self.idx_queue, self.gather(image_ids).view(-1, 1))])

        loss_itm, itm_accuracy = self._itm(image_embeds, input_ids, attention_mask, image_feat,
                                           text_feat, image_ids, generator, negatives)
        return FilterOutput(loss_itc + loss_itm, loss_itc, loss_itm, itm_accuracy)

    def _itm(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor, image_feat: Tensor,
             text_feat: Tensor, image_ids: Tensor, generator: torch.Generator | None,
             negatives: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Negatives from online vs online similarity; all same-id pairs masked (BLIP retrieval).

        With `negative_all_rank`, candidates (features, ids, texts, image tokens) are gathered
        from every rank; image tokens keep their gradient through `gather_with_grad`.
        """
        enc_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        if self.config.negative_all_rank:
            cand_image_feat, cand_text_feat = self.gather(image_feat.detach()), self.gather(text_feat.detach())
            cand_ids, cand_mask = self.gather(enc_ids), self.gather(attention_mask)
            cand_image_ids = self.gather(image_ids)
            images = torch.cat([image_embeds, self.gather_with_grad(image_embeds)])  # own rows first
            offset = image_embeds.shape[0]
        else:
            cand_image_feat, cand_text_feat = image_feat, text_feat
            cand_ids, cand_mask, cand_image_ids = enc_ids, attention_mask, image_ids
            images, offset = image_embeds, 0
        with torch.no_grad():
            sim_t2i = text_feat @ cand_image_feat.t() / self.temp  # (B, C)
            sim_i2t = image_feat @ cand_text_feat.t() / self.temp
            positive = image_ids.view(-1, 1) == cand_image_ids.view(1, -1)
            weights = self.negative_weights(sim_t2i, sim_i2t, positive, 0.0)
        image_kv = self.text_encoder.image_kv(images)
        return self.itm_objective(image_kv, enc_ids, attention_mask, weights,
                                  (cand_ids, cand_mask, offset), generator, negatives)
