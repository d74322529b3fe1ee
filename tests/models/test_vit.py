"""The timm image encoder: token output, BLIP names, checkpointing, position tables."""

import pytest
import torch

from models.config import resolve_config
from models.vit import build_vit, interpolate_pos_embed, sincos_pos_embed


@pytest.fixture(scope="module")
def tiny_vision():
    return resolve_config("tiny", {"vision.depth": 2}).vision


def test_returns_all_tokens_after_final_norm(tiny_vision):
    torch.manual_seed(0)
    vit = build_vit(tiny_vision).eval()
    out = vit(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 17, 128)
    assert vit.norm.eps == 1e-6 and vit.blocks[0].norm1.eps == 1e-6
    assert vit.blocks[0].attn.qkv.bias is not None
    # final LayerNorm (unit weight, zero bias at init) -> every token has ~zero mean, unit variance
    assert out.mean(-1).abs().max() < 1e-5
    names = set(vit.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias", "norm.weight"} <= names
    assert not any(n.startswith("head") and vit.state_dict()[n].numel() for n in names)


def test_gradient_checkpointing_matches(tiny_vision):
    torch.manual_seed(0)
    plain = build_vit(tiny_vision)
    ckpt_cfg = resolve_config("tiny", {"vision.depth": 2, "vision.grad_checkpointing": True,
                                       "vision.grad_ckpt_layers": 1}).vision
    ckpt = build_vit(ckpt_cfg)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name, rtol=1e-5, atol=1e-6)


def test_sincos_init_is_option():
    learned = build_vit(resolve_config("tiny", {"vision.pos_embed_init": "learned"}).vision)
    sincos = build_vit(resolve_config("tiny").vision)
    table = sincos_pos_embed(128, 4, step=4.0, gain=3.0)
    assert table.shape == (17, 128) and torch.all(table[0] == 0)
    torch.testing.assert_close(sincos.pos_embed[0].detach(), table)
    assert not torch.allclose(learned.pos_embed[0].detach(), table)
    assert sincos.pos_embed.requires_grad


def test_sincos_step_and_gain():
    plain, stepped = sincos_pos_embed(128, 4), sincos_pos_embed(128, 4, step=4.0)
    # patch (i, j) at step s is patch (s*i, s*j) of a step-1 table on a larger grid
    torch.testing.assert_close(stepped[1 + 4 + 1], sincos_pos_embed(128, 5)[1 + 4 * 5 + 4])
    # a larger step spreads neighbouring patches apart: the faint signal of a small grid
    def nearest(t):
        d = torch.cdist(t[1:], t[1:])
        return d.masked_fill(torch.eye(len(d), dtype=torch.bool), float("inf")).min()
    assert nearest(stepped) > 2 * nearest(plain)
    torch.testing.assert_close(sincos_pos_embed(128, 4, gain=3.0), 3 * plain)


@pytest.mark.parametrize("key", ["vision.pos_embed_step", "vision.pos_embed_gain"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_sincos_step_and_gain_must_be_positive(key, value):
    with pytest.raises(ValueError, match=key):
        resolve_config("tiny", {key: value})


def test_interpolate_pos_embed_keeps_cls_and_resizes():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = interpolate_pos_embed(pos, 24)
    assert out.shape == (1, 1 + 24 * 24, 8)
    torch.testing.assert_close(out[:, 0], pos[:, 0])
    assert interpolate_pos_embed(pos, 14) is pos
    # a constant table stays constant under bicubic resize
    const = torch.ones(1, 1 + 4, 3)
    torch.testing.assert_close(interpolate_pos_embed(const, 3), torch.ones(1, 10, 3))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos_embed(torch.randn(1, 6, 3), 2)
