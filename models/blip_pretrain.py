"""`BlipPretrain`: BLIP's pre-training model (ITC + ITM + LM) with encoder/decoder sharing.

The text decoder shares every parameter with the text encoder except the self-attention
sublayer (`attention.self.*`, `attention.output.*`): embeddings, cross-attention and FFN are the
same modules (so the same Parameter objects), and the LM head is tied to the shared word
embeddings. `state_dict()` still lists both `text_encoder.*` and `text_decoder.bert.*`, as the
official checkpoints do. One step: one ViT pass (+ momentum ViT), the text-mode encoder, one
multimodal encoder pass over B positives and up to 2B hard negatives, and the decoder; the image
cross-attention keys/values are computed once and shared by ITM and (when shared) the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.blip_base import BlipEncoderBase, with_first_token
from models.config import BlipConfig
from models.kv_cache import ImageKV
from models.losses import dequeue_and_enqueue, diagonal_targets, image_id_targets, itc_loss, lm_labels, lm_loss
from models.med import TextDecoder, TextTransformer

ITM_EPS = 1e-4  # added to the pre-training sampling weights after the softmax (BLIP)


@dataclass(frozen=True)
class PretrainOutput:
    """Losses of one pre-training step; `loss` = itc + itm + lm."""

    loss: Tensor
    loss_itc: Tensor
    loss_itm: Tensor
    loss_lm: Tensor
    itm_accuracy: Tensor  # detached


def tie_encoder_decoder(encoder: TextTransformer, decoder: TextTransformer, share_cross_attention: bool) -> None:
    """Make `decoder` use the encoder's embeddings, FFN and (optionally) cross-attention modules."""
    decoder.embeddings = encoder.embeddings
    for enc_layer, dec_layer in zip(encoder.layers, decoder.layers, strict=True):
        if share_cross_attention:
            dec_layer.crossattention = enc_layer.crossattention
        dec_layer.intermediate = enc_layer.intermediate
        dec_layer.output = enc_layer.output


class BlipPretrain(BlipEncoderBase):
    """ViT + text encoder + text decoder (shared), projections, ITM head, momentum copies, queues."""

    # Checkpoints exported before the image-id queue existed lack it: it then starts empty.
    optional_state_keys = frozenset({"idx_queue"})

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.text_decoder = TextDecoder(config.text, config.vision.width)
        tie_encoder_decoder(self.text_encoder, self.text_decoder.bert, config.share_cross_attention)
        self.text_decoder.tie_weights()
        self._build_momentum()
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # The image ids of the queued features (-100: unknown); read only with `image_positives`.
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), -100, dtype=torch.long))

    def forward(self, image: Tensor, input_ids: Tensor, attention_mask: Tensor, alpha: float,
                image_ids: Tensor | None = None, generator: torch.Generator | None = None,
                negatives: tuple[Tensor, Tensor, Tensor] | None = None,
                image_positives: bool = False) -> PretrainOutput:
        """image (B, 3, H, W); input_ids (B, T) `[CLS] ... [SEP] [PAD]...`; attention_mask (B, T).

        `alpha` is the current distillation weight (see `losses.alpha_ramp`). `image_ids` (B,),
        when given, keeps captions of the same image from being drawn as ITM negatives; with
        `image_positives` they are also ITC positives (in the batch and in the queue) instead of
        negatives, as in BLIP's retrieval fine-tune; off: BLIP's pre-training (the diagonal).
        `negatives` = (ids (B, T), mask (B, T), valid (B,) bool): extra ITM negative texts, row i
        matched against image i where valid (word-swap negatives; only ITM sees them).
        """
        cfg = self.config.text
        if self.momentum_in_forward:
            self.momentum_step()  # temperature clamp + EMA before this step's momentum forward
        image_embeds = self.visual_encoder(image)  # (B, 1+N, Dv)
        image_feat = self.image_features(image_embeds)  # (B, E)
        text_ids = with_first_token(input_ids, cfg.cls_token_id)
        text_hidden = self.text_encoder(text_ids, attention_mask, mode="text")
        text_feat = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)  # (B, E)

        image_feat_m, text_feat_m = self.momentum_features(image, text_ids, attention_mask)
        batch = image.shape[0]
        if image_positives and image_ids is None:
            raise ValueError("image_positives needs image_ids")
        if image_ids is not None:
            image_ids = image_ids.view(-1).to(device=image.device, dtype=torch.long)
        queue_ids = image_ids if image_ids is not None else torch.full(
            (batch,), -100, dtype=torch.long, device=image.device)
        targets = (image_id_targets(queue_ids, self.idx_queue) if image_positives
                   else diagonal_targets(batch, self.config.queue_size, image.device))
        # A copy of temp: autograd then keeps no reference to the parameter, which ZeRO-3 frees
        # after forward (it cannot hook this dataclass output to fetch it back for backward).
        loss_itc = itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue,
                            self.text_queue, self.temp.clone(), alpha, targets)
        dequeue_and_enqueue(self.queue_ptr, [(self.image_queue, self.gather(image_feat_m)),
                                             (self.text_queue, self.gather(text_feat_m)),
                                             (self.idx_queue, self.gather(queue_ids).view(-1, 1))])

        image_kv = self.text_encoder.image_kv(image_embeds)  # once per layer, B images
        loss_itm, itm_accuracy = self._itm(image_kv, input_ids, attention_mask, image_feat, text_feat,
                                           image_feat_m, text_feat_m, image_ids, generator, negatives)

        dec_ids = with_first_token(input_ids, cfg.bos_token_id)
        dec_kv = image_kv if self.config.share_cross_attention else None
        logits = self.text_decoder(dec_ids, attention_mask, image_embeds=image_embeds, image_kv=dec_kv)
        loss_lm = lm_loss(logits, lm_labels(dec_ids, attention_mask), self.config.label_smoothing)
        return PretrainOutput(loss_itc + loss_itm + loss_lm, loss_itc, loss_itm, loss_lm, itm_accuracy)

    def _itm(self, image_kv: ImageKV, input_ids: Tensor, attention_mask: Tensor, image_feat: Tensor, text_feat: Tensor,
             image_feat_m: Tensor, text_feat_m: Tensor, image_ids: Tensor | None,
             generator: torch.Generator | None,
             negatives: tuple[Tensor, Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Hard negatives from online vs in-batch momentum similarity (+1e-4, positives zeroed)."""
        batch = input_ids.shape[0]
        with torch.no_grad():
            sim_i2t = image_feat @ text_feat_m.t() / self.temp  # (B, B)
            sim_t2i = text_feat @ image_feat_m.t() / self.temp
            if image_ids is None:
                positive = torch.eye(batch, dtype=torch.bool, device=input_ids.device)
            else:
                positive = image_ids.view(-1, 1) == image_ids.view(1, -1)
            weights = self.negative_weights(sim_t2i, sim_i2t, positive, ITM_EPS)
        enc_ids = with_first_token(input_ids, self.config.text.enc_token_id)
        return self.itm_objective(image_kv, enc_ids, attention_mask, weights,
                                  (enc_ids, attention_mask, 0), generator, negatives)
