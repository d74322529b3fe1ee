"""The encoder side shared by `BlipPretrain` and `BlipFilter`: ViT, text encoder, ITC/ITM heads.

Holds the online modules (`visual_encoder`, `text_encoder`, `vision_proj`, `text_proj`,
`itm_head`, `temp`), their momentum copies (`*_m`, never trained by gradients) and the ITC
feature queues, plus the inference helpers used by retrieval and the CapFilt filter: image and
text features for ITC, and ITM logits/scores that encode each image once and share its
cross-attention keys/values across all candidate texts. Distributed gathers are injected as the
attributes `gather` (all-gather without grad) and `gather_with_grad`; both default to identity.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import BlipConfig
from models.kv_cache import ImageKV
from models.losses import ema_update, hard_negative_weights, itm_labels, itm_loss, sample_negatives
from models.med import TextTransformer
from models.vit import build_vit

logger = logging.getLogger(__name__)

Gather = Callable[[Tensor], Tensor]


def identity(x: Tensor) -> Tensor:
    """The single-process gather."""
    return x


def with_first_token(input_ids: Tensor, token_id: int) -> Tensor:
    """A copy of (B, T) ids with position 0 replaced ([CLS] -> [ENC] / [DEC])."""
    ids = input_ids.clone()
    ids[:, 0] = token_id
    return ids


def pad_texts(texts: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """1-D id tensors -> right-padded ids (M, T) and attention mask (M, T)."""
    if not texts:
        raise ValueError("no texts given")
    length = max(t.numel() for t in texts)
    ids = torch.full((len(texts), length), pad_id, dtype=torch.long, device=texts[0].device)
    mask = torch.zeros_like(ids)
    for row, text in enumerate(texts):
        ids[row, : text.numel()] = text
        mask[row, : text.numel()] = 1
    return ids, mask


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters take no gradient (momentum encoder)."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


def load_subset(model: nn.Module, state_dict: Mapping[str, Tensor], may_miss: set[str]) -> None:
    """Load the keys `model` has (copies, so nothing stays tied to the source).

    Keys the model lacks are ignored; keys the source lacks, or with another shape, raise
    `ValueError` unless listed in `may_miss` (then skipped, e.g. a queue of another length).
    """
    own = model.state_dict()
    picked = {}
    for key, value in state_dict.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if key not in may_miss:
                raise ValueError(f"state dict key {key} has shape {tuple(value.shape)}, the model "
                                 f"expects {tuple(own[key].shape)}; check the model config")
            logger.info("not loading %s: shape %s, model has %s", key, tuple(value.shape), tuple(own[key].shape))
            continue
        picked[key] = value
    missing = sorted(set(own) - set(picked) - may_miss)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"state dict lacks {len(missing)} keys the model needs: {shown}")
    model.load_state_dict(picked, strict=False)


Gathered = Callable[[list[nn.Parameter]], AbstractContextManager[object]]


def _no_gather(params: list[nn.Parameter]) -> AbstractContextManager[object]:
    return nullcontext()


class BlipEncoderBase(nn.Module):
    """ViT + text encoder + projections + ITM head + temp, momentum copies and ITC queues."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        vision_width, text_width = config.vision.width, config.text.hidden_size
        self.visual_encoder = build_vit(config.vision)
        self.text_encoder = TextTransformer(config.text, vision_width)
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(config.temp))
        self.gather: Gather = identity
        self.gather_with_grad: Gather = identity
        # BLIP clamps the temperature and moves the momentum copies at the start of each forward.
        # A training loop that must do it outside forward (ZeRO-3 gathers the parameters first)
        # sets this False and calls `momentum_step` itself before each forward: same arithmetic.
        self.momentum_in_forward = True

    def _build_momentum(self) -> None:
        """Momentum copies and queues; call after any weight tying of the online modules."""
        self.visual_encoder_m = frozen_copy(self.visual_encoder)
        self.visual_encoder_m.set_grad_checkpointing(False)
        self.visual_encoder_m.ckpt_layers = 0
        self.vision_proj_m = frozen_copy(self.vision_proj)
        self.text_encoder_m = frozen_copy(self.text_encoder)
        self.text_proj_m = frozen_copy(self.text_proj)
        queue_shape = (self.config.embed_dim, self.config.queue_size)
        self.register_buffer("image_queue", F.normalize(torch.randn(queue_shape), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(queue_shape), dim=0))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum) module pairs updated by the EMA."""
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    def momentum_step(self, gathered: Gathered | None = None, group_size: int = 32) -> None:
        """Clamp the temperature, then one EMA step of the momentum copies towards the online ones.

        `gathered(params)` is a context in which `params` are whole and writable (ZeRO-3 passes
        DeepSpeed's `GatheredParameters`); the EMA walks the parameters `group_size` tensor pairs
        at a time, so no more than that is ever gathered at once.
        """
        gathered = gathered or _no_gather
        with gathered([self.temp]):
            self.clamp_temp()
        for online, ema in self.momentum_pairs():
            pairs = list(zip(online.parameters(), ema.parameters(), strict=True))
            for start in range(0, len(pairs), group_size):
                group = pairs[start : start + group_size]
                with gathered([p for pair in group for p in pair]):
                    ema_update(group, self.config.momentum)

    def clamp_temp(self) -> None:
        """Keep the learned temperature in [0.001, 0.5] (in place, as BLIP)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

    def encode_image(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) -> ViT tokens (B, 1+N, Dv)."""
        return self.visual_encoder(image)

    def image_features(self, image_embeds: Tensor) -> Tensor:
        """(B, 1+N, Dv) -> normalised ITC features (B, E) from the class token."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(M, T) ids ([CLS] written at 0) -> normalised ITC features (M, E); no image."""
        ids = with_first_token(input_ids, self.config.text.cls_token_id)
        hidden = self.text_encoder(ids, attention_mask, mode="text")
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    @torch.no_grad()
    def momentum_features(self, image: Tensor, text_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Momentum ITC features (B, E) of images and [CLS] texts."""
        image_m = self.visual_encoder_m(image)
        image_feat_m = F.normalize(self.vision_proj_m(image_m[:, 0]), dim=-1)
        text_m = self.text_encoder_m(text_ids, attention_mask, mode="text")
        text_feat_m = F.normalize(self.text_proj_m(text_m[:, 0]), dim=-1)
        return image_feat_m, text_feat_m

    def itc_similarity(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Cosine similarity (B_img, M) of projected features (no temperature)."""
        return self.image_features(image_embeds) @ self.text_features(input_ids, attention_mask).t()

    def itm_logits(self, image_embeds: Tensor, input_ids: Tensor | Sequence[Tensor],
                   attention_mask: Tensor | None, text_image_index: Tensor) -> Tensor:
        """ITM logits (M, 2) of M texts against their images; [ENC] is written at position 0.

        image_embeds (B, 1+N, Dv) from `encode_image`; input_ids (M, T), or a list of M 1-D id
        tensors (then attention_mask must be None); text_image_index (M,) long into the B images.
        Each image's cross-attention keys/values are computed once for all of its texts.
        """
        if not isinstance(input_ids, Tensor):
            if attention_mask is not None:
                raise ValueError("pass attention_mask=None with a list of texts; it is built from their lengths")
            input_ids, attention_mask = pad_texts(input_ids, self.config.text.pad_token_id)
        if text_image_index.shape[0] != input_ids.shape[0]:
            raise ValueError(f"text_image_index has {text_image_index.shape[0]} rows for {input_ids.shape[0]} texts")
        ids = with_first_token(input_ids, self.config.text.enc_token_id)
        image_kv = self.text_encoder.image_kv(image_embeds, text_image_index)
        hidden = self.text_encoder(ids, attention_mask, mode="multimodal", image_kv=image_kv)
        return self.itm_head(hidden[:, 0]).float()

    def itm_scores(self, image_embeds: Tensor, input_ids: Tensor | Sequence[Tensor],
                   attention_mask: Tensor | None, text_image_index: Tensor) -> Tensor:
        """Match probabilities (M,): softmax of the ITM head, class 1 = match."""
        logits = self.itm_logits(image_embeds, input_ids, attention_mask, text_image_index)
        return logits.softmax(dim=1)[:, 1]

    def itm_objective(self, image_kv: ImageKV, enc_ids: Tensor, attention_mask: Tensor,
                      weights: tuple[Tensor, Tensor], candidates: tuple[Tensor, Tensor, int],
                      generator: torch.Generator | None,
                      extra: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """ITM loss on B positives + one negative image per text + one negative text per image.

        image_kv: image-level keys over the candidate images (rows 0..B-1 are the batch's own
        images, candidate c is row `offset + c`); weights: (w_t2i (B, C_img), w_i2t (B, C_txt))
        sampling weights with positives zeroed; candidates: (ids (C_txt, T), mask, offset).
        extra: (ids (B, T) `[CLS] ...`, mask (B, T), valid (B,) bool), one more negative text per
        image where valid (word-swap / -exchange negatives; `[ENC]` is written here); the positive
        pair of such a row then counts twice (on top of `itm_positive_weight`), so that a kind of
        caption that brings extra negatives (an exchange needs two objects) is less of a likelier
        mismatch. Returns (loss, accuracy).
        """
        w_t2i, w_i2t = weights
        cand_ids, cand_mask, offset = candidates
        batch = enc_ids.shape[0]
        own = torch.arange(batch, device=enc_ids.device)
        neg_image, has_neg_image = sample_negatives(w_t2i, generator)  # per text
        neg_text, has_neg_text = sample_negatives(w_i2t, generator)  # per image
        neg_text = neg_text[has_neg_text]
        ids = [enc_ids, enc_ids[has_neg_image], cand_ids[neg_text]]  # (B + n1 + n2 [+ n3], T)
        mask = [attention_mask, attention_mask[has_neg_image], cand_mask[neg_text]]
        image_rows = [own, offset + neg_image[has_neg_image], own[has_neg_text]]
        if extra is not None:
            extra_ids, extra_mask, valid = extra
            assert valid.dtype == torch.bool and extra_ids.shape == enc_ids.shape  # (B,) rows, (B, T)
            extra_ids = with_first_token(extra_ids[valid], self.config.text.enc_token_id)
            ids, mask, image_rows = ids + [extra_ids], mask + [extra_mask[valid]], image_rows + [own[valid]]
        ids, mask, image_rows = torch.cat(ids), torch.cat(mask), torch.cat(image_rows)
        kv = ImageKV.build(image_kv.keys, image_kv.values, image_rows)
        hidden = self.text_encoder(ids, mask, mode="multimodal", image_kv=kv)
        logits = self.itm_head(hidden[:, 0])  # (B + n1 + n2 [+ n3], 2)
        labels = itm_labels(batch, ids.shape[0] - batch, device=ids.device)
        row_weight = None
        if extra is not None:
            row_weight = torch.ones(ids.shape[0], device=ids.device)
            row_weight[:batch] += extra[2].to(row_weight.dtype)  # its positive once more per extra negative
        return itm_loss(logits, labels, self.config.itm_positive_weight, row_weight)

    def negative_weights(self, sim_t2i: Tensor, sim_i2t: Tensor, positive: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """Negative sampling weights for both directions from the similarity logits (sim / temp);
        positive (B, C) bool. The logits are scaled by `itm_negative_hardness` (0: uniform)."""
        hardness = self.config.itm_negative_hardness
        return (hard_negative_weights(hardness * sim_t2i, positive, eps),
                hard_negative_weights(hardness * sim_i2t, positive, eps))
