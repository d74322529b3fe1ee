"""BLIP objectives on 4x8 tensors against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.losses import (alpha_ramp, dequeue_and_enqueue, diagonal_targets, hard_negative_weights,
                           image_id_targets, itc_loss, itm_labels, itm_loss, lm_labels, lm_loss,
                           ema_update, sample_negatives, soft_cross_entropy)


def _feats(n, e, seed):
    return F.normalize(torch.randn(n, e, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_alpha_ramp():
    assert alpha_ramp(0, 100, 0.4) == 0.0
    assert alpha_ramp(50, 100, 0.4) == pytest.approx(0.2)
    assert alpha_ramp(500, 100, 0.4) == pytest.approx(0.4)
    assert alpha_ramp(3, 0, 0.4) == 0.4


def test_targets():
    t = diagonal_targets(2, 3)
    assert t.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]
    ids, queue = torch.tensor([7, 7, 8]), torch.tensor([[8, -100, 7, 7]])
    t = image_id_targets(ids, queue)  # columns: 7 7 8 | 8 -100 7 7
    assert t[0].tolist() == pytest.approx([0.25, 0.25, 0, 0, 0, 0.25, 0.25])
    assert t[2].tolist() == pytest.approx([0, 0, 0.5, 0.5, 0, 0, 0])


def test_soft_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    target = torch.tensor([[0.5, 0.5, 0.0]])
    z = math.log(math.e + math.e**2 + 1)
    assert soft_cross_entropy(logits, target).item() == pytest.approx(0.5 * (z - 1) + 0.5 * (z - 2))


def test_itc_loss_by_hand():
    b, e, q = 4, 8, 4
    img, txt, img_m, txt_m = (_feats(b, e, s) for s in range(4))
    iq, tq = _feats(q, e, 5).t(), _feats(q, e, 6).t()  # (E, Q)
    temp, alpha = torch.tensor(0.1), 0.4
    hard = diagonal_targets(b, q)
    loss = itc_loss(img, txt, img_m, txt_m, iq, tq, temp, alpha, hard)

    def direction(online, mom_rows, mom_cols, queue):
        cols = torch.cat([mom_cols, queue.t()])  # (B+Q, E)
        target = alpha * torch.softmax(mom_rows @ cols.t() / temp, 1) + (1 - alpha) * hard
        logp = torch.log_softmax(online @ cols.t() / temp, 1)
        return -(logp * target).sum(1).mean()

    expected = (direction(img, img_m, txt_m, tq) + direction(txt, txt_m, img_m, iq)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # alpha = 0 is plain cross-entropy on the diagonal
    plain = itc_loss(img, txt, img_m, txt_m, iq, tq, temp, 0.0, hard)
    ce = F.cross_entropy(img @ torch.cat([txt_m, tq.t()]).t() / temp, torch.arange(b))
    ce2 = F.cross_entropy(txt @ torch.cat([img_m, iq.t()]).t() / temp, torch.arange(b))
    assert plain.item() == pytest.approx(((ce + ce2) / 2).item(), rel=1e-6)


def test_itc_gradient_reaches_only_online_features():
    img, txt = _feats(4, 8, 0).requires_grad_(), _feats(4, 8, 1).requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    loss = itc_loss(img, txt, _feats(4, 8, 2), _feats(4, 8, 3), _feats(4, 8, 4).t(), _feats(4, 8, 5).t(),
                    temp, 0.4, diagonal_targets(4, 4))
    loss.backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and temp.grad != 0


def test_queue_pointer_contents_and_wrap():
    queue, ids = torch.zeros(3, 8), torch.full((1, 8), -100)
    ptr = torch.zeros(1, dtype=torch.long)
    for step in range(5):
        rows = torch.full((4, 3), float(step))
        dequeue_and_enqueue(ptr, [(queue, rows), (ids, torch.full((4, 1), step))])
        assert ptr.item() == (step + 1) * 4 % 8
    # steps 0..4 wrote at 0, 4, 0, 4, 0 -> columns 0:4 hold step 4, columns 4:8 step 3
    assert queue[:, :4].eq(4).all() and queue[:, 4:].eq(3).all()
    assert ids[0].tolist() == [4, 4, 4, 4, 3, 3, 3, 3]
    with pytest.raises(ValueError, match="not a multiple of the global batch"):
        dequeue_and_enqueue(ptr, [(queue, torch.zeros(3, 3))])


def test_ema_update_moves_each_momentum_tensor_towards_its_online_one():
    online, ema = nn.Linear(2, 3), nn.Linear(2, 3)
    with torch.no_grad():
        for p in online.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
    ema_update(zip(online.parameters(), ema.parameters()), 0.9)
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.1))
    assert online.weight.eq(1.0).all()


def test_hard_negative_weights_by_hand():
    sim = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    pos = torch.eye(2, 3, dtype=torch.bool)
    w = hard_negative_weights(sim, pos, eps=1e-4)
    s = torch.softmax(sim, 1) + 1e-4
    assert w[0, 0] == 0 and w[0, 1] == pytest.approx(s[0, 1].item()) and w[1, 1] == 0
    # underflow -> uniform over negatives; no negative -> all zero
    w = hard_negative_weights(torch.tensor([[1e4, 0.0, 0.0], [0.0, 0.0, 0.0]]),
                              torch.tensor([[True, False, False], [True, True, True]]))
    assert w[0].tolist() == [0.0, 1.0, 1.0] and w[1].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("ids", [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 1]])
def test_sampling_never_picks_a_positive(ids):
    ids = torch.tensor(ids)
    positive = ids[:, None] == ids[None, :]
    for seed in range(100):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randn(8, 8, generator=g) * 10
        sim[positive] += 50  # positives are the most similar: the likeliest to be drawn if unmasked
        index, valid = sample_negatives(hard_negative_weights(sim, positive, 1e-4), g)
        assert valid.all()
        assert not positive[torch.arange(8), index].any()


def test_all_same_image_id_skips_rows():
    positive = torch.ones(4, 4, dtype=torch.bool)
    index, valid = sample_negatives(hard_negative_weights(torch.randn(4, 4), positive, 1e-4))
    assert not valid.any() and index.tolist() == [0, 0, 0, 0]


def test_sampling_is_reproducible_with_generator():
    w = torch.rand(4, 8)
    a = sample_negatives(w, torch.Generator().manual_seed(3))[0]
    b = sample_negatives(w, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_itm_loss_and_labels():
    labels = itm_labels(2, 4)
    assert labels.tolist() == [1, 1, 0, 0, 0, 0]
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, -1.0]])
    loss, acc = itm_loss(logits, labels)
    expected = F.cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(expected.item())
    assert acc.item() == pytest.approx(4 / 6)  # the [2, 2] tie goes to class 0


def test_itm_positive_weight_balances_the_classes_by_hand():
    labels = itm_labels(2, 4)
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [2.0, 2.0], [1.0, -1.0]])
    per_row = F.cross_entropy(logits, labels, reduction="none")
    loss, _ = itm_loss(logits, labels, positive_weight=2.0)
    expected = (2 * per_row[:2].sum() + per_row[2:].sum()) / (2 * 2 + 4)  # positives count double
    assert loss.item() == pytest.approx(expected.item())
    assert itm_loss(logits, labels, 1.0)[0].item() == pytest.approx(per_row.mean().item())
    rows = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # row weights multiply the class weight
    loss, _ = itm_loss(logits, labels, positive_weight=2.0, row_weight=rows)
    expected = (6 * per_row[0] + 2 * per_row[1] + per_row[2:].sum()) / (6 + 2 + 4)
    assert loss.item() == pytest.approx(expected.item())


def test_lm_labels_and_loss_by_hand():
    ids = torch.tensor([[3, 10, 11, 2, 0], [3, 12, 2, 0, 0]])
    mask = (ids != 0).long()
    labels = lm_labels(ids, mask, prompt_length=2)
    assert labels.tolist() == [[-100, -100, 11, 2, -100], [-100, -100, 2, -100, -100]]
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    loss = lm_loss(logits, labels, label_smoothing=0.1)
    # predicted positions: (row 0, t=1 -> 11), (row 0, t=2 -> 2), (row 1, t=1 -> 2)
    picks = [(0, 1, 11), (0, 2, 2), (1, 1, 2)]
    terms = []
    for r, t, y in picks:
        logp = torch.log_softmax(logits[r, t], 0)
        terms.append(-(0.9 * logp[y] + 0.1 * logp.mean()))
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    empty = lm_loss(logits.requires_grad_(), torch.full((2, 5), -100))
    assert empty.item() == 0.0 and empty.requires_grad
