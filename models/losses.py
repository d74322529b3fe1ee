"""BLIP's objectives as small functions on tensors: ITC, ITM hard negatives, LM, queues, EMA.

ITC is ALBEF's contrastive loss with a learned temperature, momentum-distilled soft targets
(`alpha*softmax(sim_m) + (1-alpha)*hard`) and feature queues; the hard targets are the diagonal in
pre-training and every same-image-id pair in fine-tuning. ITM draws one hard negative image per
text and one negative text per image from similarity-weighted multinomials that never pick a
positive. LM is label-smoothed cross-entropy on shifted tokens with pads and prompt masked. The
momentum EMA and the queue update are in-place helpers; distributed gathers are done by the
caller, so every function here works on one process and on 4x8 tensors in a unit test.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def alpha_ramp(step: int, ramp_steps: int, alpha: float) -> float:
    """Distillation weight: linear from 0 to `alpha` over the first `ramp_steps` steps."""
    if ramp_steps <= 0:
        return alpha
    return alpha * min(1.0, step / ramp_steps)


@torch.no_grad()
def ema_update(pairs: Iterable[tuple[Tensor, Tensor]], momentum: float) -> None:
    """EMA `p_m = m*p_m + (1-m)*p` over (online, momentum) parameter pairs, in place."""
    for p, p_m in pairs:
        p_m.mul_(momentum).add_(p.detach().to(p_m.dtype), alpha=1.0 - momentum)


def diagonal_targets(batch: int, queue_size: int, device: torch.device | None = None) -> Tensor:
    """Pre-training hard ITC targets (B, B+Q): the in-batch diagonal; queue columns negative."""
    targets = torch.zeros(batch, batch + queue_size, device=device)
    targets[:, :batch] = torch.eye(batch, device=device)
    return targets


def image_id_targets(image_ids: Tensor, queue_ids: Tensor) -> Tensor:
    """Fine-tuning hard ITC targets (B, B+Q): every same-image-id column, rows sum to 1."""
    all_ids = torch.cat([image_ids.view(-1), queue_ids.view(-1)])  # (B+Q,)
    pos = (image_ids.view(-1, 1) == all_ids.view(1, -1)).float()  # (B, B+Q)
    return pos / pos.sum(1, keepdim=True)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-(log_softmax(logits) * targets).sum(1).mean()."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(1).mean()


def itc_loss(image_feat: Tensor, text_feat: Tensor, image_feat_m: Tensor, text_feat_m: Tensor,
             image_queue: Tensor, text_queue: Tensor, temp: Tensor, alpha: float,
             targets: Tensor) -> Tensor:
    """Momentum-distilled contrastive loss, averaged over both directions.

    image_feat, text_feat (B, E) online, normalised; image_feat_m, text_feat_m (B, E) momentum;
    image_queue, text_queue (E, Q); targets (B, B+Q) hard targets, rows summing to 1.
    """
    image_all = torch.cat([image_feat_m.t(), image_queue], dim=1).detach()  # (E, B+Q); a copy
    text_all = torch.cat([text_feat_m.t(), text_queue], dim=1).detach()
    with torch.no_grad():
        sim_i2t_m = image_feat_m @ text_all / temp  # (B, B+Q)
        sim_t2i_m = text_feat_m @ image_all / temp
        target_i2t = alpha * F.softmax(sim_i2t_m.float(), dim=1) + (1 - alpha) * targets
        target_t2i = alpha * F.softmax(sim_t2i_m.float(), dim=1) + (1 - alpha) * targets
    sim_i2t = image_feat @ text_all / temp  # (B, B+Q)
    sim_t2i = text_feat @ image_all / temp
    return (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2


@torch.no_grad()
def dequeue_and_enqueue(ptr: Tensor, updates: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Write rows at the pointer and advance it (in place).

    ptr (1,) long; updates: (queue (E, Q), rows (G, E)) pairs, G = the global batch (gathered
    over ranks by the caller). Rows of a 1-D id vector are passed as (G, 1).
    """
    queue_size = updates[0][0].shape[1]
    global_batch = updates[0][1].shape[0]
    if queue_size % global_batch:
        raise ValueError(
            f"queue_size {queue_size} is not a multiple of the global batch {global_batch} "
            "(per-rank batch x ranks); change model queue_size or the batch size, and drop the "
            "last incomplete batch")
    start = int(ptr[0])
    for queue, rows in updates:
        queue[:, start:start + global_batch] = rows.t().to(queue.dtype)
    ptr[0] = (start + global_batch) % queue_size


@torch.no_grad()
def hard_negative_weights(sim: Tensor, positive: Tensor, eps: float = 0.0) -> Tensor:
    """Sampling weights (B, C): softmax(sim) + eps with positives zeroed.

    Where every candidate weight underflows to 0 but negatives exist, the row falls back to
    uniform over the negatives; a row with no negative candidate stays all-zero (skipped).
    """
    weights = F.softmax(sim.float(), dim=1) + eps
    negatives = ~positive
    weights = weights.masked_fill(positive, 0.0)
    dead = (weights.sum(1) <= 0) & negatives.any(1)
    return torch.where(dead[:, None], negatives.float(), weights)


@torch.no_grad()
def sample_negatives(weights: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One column per row from `weights` (B, C) -> (index (B,) long, valid (B,) bool).

    Rows whose weights are all zero (no negative exists) are invalid; their index is 0 and
    must be skipped by the caller.
    """
    valid = weights.sum(1) > 0
    index = torch.zeros(weights.shape[0], dtype=torch.long, device=weights.device)
    if bool(valid.any()):
        rows = weights[valid]
        if generator is not None and generator.device != rows.device:
            drawn = torch.multinomial(rows.to(generator.device), 1, generator=generator).to(rows.device)
        else:
            drawn = torch.multinomial(rows, 1, generator=generator)
        index[valid] = drawn.squeeze(1)
    return index, valid


def itm_labels(batch: int, negatives: int, device: torch.device | None = None) -> Tensor:
    """[1]*B + [0]*negatives (class 1 = match)."""
    return torch.cat([torch.ones(batch, dtype=torch.long, device=device),
                      torch.zeros(negatives, dtype=torch.long, device=device)])


def itm_loss(logits: Tensor, labels: Tensor, positive_weight: float = 1.0,
             row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Cross-entropy over (M, 2) ITM logits -> (loss, accuracy (detached)).

    `positive_weight` weights the match class (the weighted mean of torch's cross-entropy); 1.0 is
    BLIP's plain mean, 2.0 gives its B positives the weight of its 2B negatives. `row_weight` (M,)
    multiplies each row's weight on top (None: all 1).
    """
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    weight = torch.where(labels == 1, positive_weight, 1.0).to(per_row.dtype)
    if row_weight is not None:
        weight = weight * row_weight.to(per_row.dtype)
    loss = (per_row * weight).sum() / weight.sum()
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    return loss, accuracy


def lm_labels(input_ids: Tensor, attention_mask: Tensor | None, prompt_length: int = 0) -> Tensor:
    """Targets (B, T): the ids with pads and the first `prompt_length` positions set to -100."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if prompt_length > 0:
        labels[:, :prompt_length] = IGNORE_INDEX
    return labels


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Next-token loss: logits (B, T, V) at t predict labels (B, T) at t+1 (shift inside)."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]
    if not bool((target != IGNORE_INDEX).any()):
        return shifted.sum() * 0.0  # nothing to predict: a zero that keeps the graph
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
