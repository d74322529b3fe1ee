"""Typed model configuration: frozen dataclasses for the ViT, the MED text transformer and BLIP.

Presets are data (`PRESETS`): `tiny` is the CPU-sized model of the embedded default, `base` and
`large` are BLIP's ViT-B/16 and ViT-L/16 with BERT-base. `resolve_config(preset, overrides)`
applies dotted overrides (`{"vision.depth": 2}`) and rejects unknown keys and wrong types with a
`ValueError` naming the key; `to_dict`/`from_dict` round-trip the `config.json` of a checkpoint.
The token ids of the tiny preset are placeholders: the caller sets them (and the vocabulary size)
from the trained tokenizer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

BERT_BASE_WIDTH = 768  # reference width of the BERT init std (0.02 at 768)


@dataclass(frozen=True)
class VisionConfig:
    """The timm VisionTransformer image encoder (class token, all tokens out, no head)."""

    image_size: int = 224  # square input side, pixels
    patch_size: int = 16  # conv patch embedding, kernel = stride
    width: int = 768  # token dimension D
    depth: int = 12  # transformer blocks
    heads: int = 12  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio
    drop_path: float = 0.0  # stochastic depth rate (ViT-L uses 0.1 in BLIP)
    layer_norm_eps: float = 1e-6  # BLIP's ViT uses 1e-6, not 1e-5
    grad_checkpointing: bool = False  # recompute activations in the backward pass
    grad_ckpt_layers: int = 0  # checkpoint only the last k blocks; 0 means all blocks
    pos_embed_init: str = "learned"  # "learned" (trunc-normal) or "sincos" (fixed 2-D init, learnable)
    # sincos only: the coordinate step between neighbouring patches and the table's amplitude. On a
    # 4x4 grid at step 1 most frequencies hardly move and the position signal is faint: the tiny
    # preset's captioner then places a lone object right but binds objects to positions at chance
    # (docs/quality.md, "Position binding")
    pos_embed_step: float = 1.0
    pos_embed_gain: float = 1.0

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Tokens out of the encoder, class token included."""
        return 1 + self.grid**2


@dataclass(frozen=True)
class TextConfig:
    """The BERT-style MED text transformer (encoder, image-grounded encoder and decoder)."""

    vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    dropout: float = 0.1  # hidden-state dropout
    attention_dropout: float = 0.1  # dropout on attention probabilities
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02  # BERT init std at width 768
    scale_init_with_width: bool = True  # std = initializer_range * sqrt(768 / hidden_size)
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102  # also the end-of-sequence token of the decoder
    bos_token_id: int = 30522  # [DEC], written over [CLS] for the decoder
    enc_token_id: int = 30523  # [ENC], written over [CLS] for image-text matching

    @property
    def init_std(self) -> float:
        """Std of the normal init; scaled up for narrow models so cross-attention is not starved."""
        if not self.scale_init_with_width:
            return self.initializer_range
        return self.initializer_range * math.sqrt(BERT_BASE_WIDTH / self.hidden_size)


@dataclass(frozen=True)
class BlipConfig:
    """A whole BLIP model: image encoder, text transformer, heads and training constants."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size
    queue_size: int = 57600  # ITC feature queue length; a multiple of the global batch
    momentum: float = 0.995  # EMA factor of the momentum encoders
    alpha: float = 0.4  # weight of the momentum-distilled ITC targets (after the ramp)
    temp: float = 0.07  # initial ITC temperature (learned, clamped to [0.001, 0.5])
    label_smoothing: float = 0.1  # LM loss
    share_cross_attention: bool = True  # pre-training: decoder shares cross-attention with encoder
    negative_all_rank: bool = False  # filter fine-tune: ITM negatives from every rank
    itm_positive_weight: float = 1.0  # ITM loss weight of a positive pair; 2.0 balances BLIP's 1:2 pos:neg
    # ITM negatives are drawn with weights softmax(hardness * ITC similarity / temp): 1 = BLIP's hard
    # negatives; 0 = uniform over the non-positives (for corpora of near-identical scenes: README)
    itm_negative_hardness: float = 1.0


def _sizes(width: int, depth: int, heads: int) -> dict[str, int]:
    return {"width": width, "depth": depth, "heads": heads}


PRESETS: dict[str, BlipConfig] = {
    "tiny": BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=16, **_sizes(128, 4, 4), pos_embed_init="sincos",
                            pos_embed_step=4.0, pos_embed_gain=3.0),
        text=TextConfig(
            vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
            max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, cls_token_id=1, sep_token_id=2, bos_token_id=3, enc_token_id=4,
        ),
        embed_dim=128,
        queue_size=1024,
    ),
    "base": BlipConfig(vision=VisionConfig(), text=TextConfig()),
    "large": BlipConfig(
        vision=VisionConfig(**_sizes(1024, 24, 16), drop_path=0.1),
        text=TextConfig(),
    ),
}


def to_dict(config: BlipConfig) -> dict[str, Any]:
    """A JSON-ready nested dict (the `config.json` of a checkpoint)."""
    return dataclasses.asdict(config)


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ValueError(f"unknown model config key {name!r}")
        nested = _NESTED.get((cls, key))
        kwargs[key] = _build(nested, value, name) if nested else _checked(cls(), key, value, name)
    return cls(**kwargs)


def _checked(default_obj: Any, key: str, value: Any, name: str) -> Any:
    expected = type(getattr(default_obj, key))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ValueError(f"model config key {name!r} expects {expected.__name__}, got {value!r}")
    return value


_NESTED: dict[tuple[type, str], type] = {(BlipConfig, "vision"): VisionConfig,
                                         (BlipConfig, "text"): TextConfig}


def from_dict(data: Mapping[str, Any]) -> BlipConfig:
    """Inverse of `to_dict`; unknown keys and wrong types raise `ValueError` naming the key."""
    config = _build(BlipConfig, data, "")
    validate(config)
    return config


def resolve_config(preset: str, overrides: Mapping[str, Any] | None = None) -> BlipConfig:
    """The preset with dotted overrides applied, e.g. `{"vision.depth": 2, "embed_dim": 64}`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    data = to_dict(PRESETS[preset])
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown model config key {dotted!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"unknown model config key {dotted!r}")
        if isinstance(node[leaf], dict):
            raise ValueError(f"model config key {dotted!r} is a section; override its fields ({dotted}.NAME)")
        node[leaf] = value
    return from_dict(data)


def validate(config: BlipConfig) -> None:
    """Cross-field checks; raises `ValueError` naming the offending key."""
    v, t = config.vision, config.text
    if v.image_size % v.patch_size:
        raise ValueError(f"vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}")
    if v.width % v.heads:
        raise ValueError(f"vision.width {v.width} is not divisible by vision.heads {v.heads}")
    if t.hidden_size % t.num_heads:
        raise ValueError(f"text.hidden_size {t.hidden_size} is not divisible by text.num_heads {t.num_heads}")
    if not (math.isfinite(config.itm_negative_hardness) and config.itm_negative_hardness >= 0):
        raise ValueError(f"itm_negative_hardness must be a finite number >= 0 (1: hard negatives, 0: uniform), "
                         f"got {config.itm_negative_hardness}")
    if v.pos_embed_init not in ("learned", "sincos"):
        raise ValueError(f"vision.pos_embed_init must be 'learned' or 'sincos', got {v.pos_embed_init!r}")
    for key in ("pos_embed_step", "pos_embed_gain"):
        value = getattr(v, key)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"vision.{key} must be a finite number > 0, got {value}")
    ids = {k: getattr(t, k) for k in ("pad_token_id", "cls_token_id", "sep_token_id", "bos_token_id", "enc_token_id")}
    for key, value in ids.items():
        if not 0 <= value < t.vocab_size:
            raise ValueError(f"text.{key} {value} is outside the vocabulary (text.vocab_size {t.vocab_size})")
    if config.queue_size < 1 or config.embed_dim < 1:
        raise ValueError("queue_size and embed_dim must be positive")
    if not 0.0 <= config.momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {config.momentum}")
