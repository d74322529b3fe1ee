"""Model configs across layouts: Hugging Face `BlipConfig` <-> capfilt `BlipConfig`, and the sizes
of an official checkpoint read from its tensor shapes.

Hugging Face defaults differ from BLIP's where it hurts parity (text heads 8 instead of 12, ViT
LayerNorm eps 1e-5 instead of 1e-6, dropout 0, label smoothing 0), so the export writes every
field explicitly, and the import reads a resolved transformers config object (never a raw
`config.json` dict, whose absent keys would silently mean HF defaults). capfilt-only settings
(queue size, momentum, ids of `[CLS]`/`[ENC]`, ...) travel in the extra `capfilt_config` entry
of the exported config; the HF fields win wherever both exist. An official checkpoint carries no
usable config, so `infer_official_config` reads widths, depths, vocabulary, patch and image size
from the shapes; head counts cannot be read from shapes and default to BLIP's head size of 64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from models.config import BlipConfig, from_dict, resolve_config, to_dict

HEAD_DIM = 64  # BLIP's ViT-B/L and BERT-base head size, used when heads cannot be read


def _square(size: Any, name: str) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{name} must be square, got {size}")
        size = size[0]
    return int(size)


def _check_gelu(sub: Any, name: str) -> None:
    if getattr(sub, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"{name}.hidden_act is {sub.hidden_act!r}; capfilt implements exact 'gelu' only")


def hf_config_to_capfilt(hf_config: Any, cls_token_id: int, enc_token_id: int) -> BlipConfig:
    """A capfilt config from a resolved `transformers.BlipConfig` (ids of [CLS]/[ENC] come from the
    tokenizer: HF's config has no field for them). Raises ValueError naming the field."""
    vc, tc = hf_config.vision_config, hf_config.text_config
    _check_gelu(vc, "vision_config")
    _check_gelu(tc, "text_config")
    if tc.encoder_hidden_size != vc.hidden_size:
        raise ValueError(f"text_config.encoder_hidden_size {tc.encoder_hidden_size} differs from "
                         f"vision_config.hidden_size {vc.hidden_size}")
    extra = getattr(hf_config, "capfilt_config", None)
    base = from_dict(extra) if isinstance(extra, Mapping) else resolve_config("base")
    vision = dataclasses.replace(
        base.vision, image_size=_square(vc.image_size, "vision_config.image_size"),
        patch_size=_square(vc.patch_size, "vision_config.patch_size"), width=vc.hidden_size,
        depth=vc.num_hidden_layers, heads=vc.num_attention_heads,
        mlp_ratio=vc.intermediate_size / vc.hidden_size, layer_norm_eps=float(vc.layer_norm_eps))
    text = dataclasses.replace(
        base.text, vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers,
        num_heads=tc.num_attention_heads, intermediate_size=tc.intermediate_size,
        max_position_embeddings=tc.max_position_embeddings, dropout=float(tc.hidden_dropout_prob),
        attention_dropout=float(tc.attention_probs_dropout_prob), layer_norm_eps=float(tc.layer_norm_eps),
        pad_token_id=tc.pad_token_id, sep_token_id=tc.sep_token_id, bos_token_id=tc.bos_token_id,
        cls_token_id=cls_token_id, enc_token_id=enc_token_id)
    config = dataclasses.replace(base, vision=vision, text=text, embed_dim=hf_config.image_text_hidden_size,
                                 label_smoothing=float(tc.label_smoothing))
    return from_dict(to_dict(config))  # validates the combination


def capfilt_config_to_hf(config: BlipConfig, architecture: str) -> Any:
    """A `transformers.BlipConfig` with every parity-relevant field set explicitly."""
    from transformers import BlipConfig as HFBlipConfig

    v, t = config.vision, config.text
    intermediate = v.width * v.mlp_ratio
    if intermediate != int(intermediate):
        raise ValueError(f"vision.width * vision.mlp_ratio = {intermediate} is not an integer")
    text_config = {
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "encoder_hidden_size": v.width,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "max_position_embeddings": t.max_position_embeddings,
        "hidden_act": "gelu", "layer_norm_eps": t.layer_norm_eps, "hidden_dropout_prob": t.dropout,
        "attention_probs_dropout_prob": t.attention_dropout, "initializer_range": t.initializer_range,
        "bos_token_id": t.bos_token_id, "eos_token_id": t.sep_token_id, "sep_token_id": t.sep_token_id,
        "pad_token_id": t.pad_token_id, "is_decoder": True, "label_smoothing": config.label_smoothing,
    }
    vision_config = {
        "hidden_size": v.width, "intermediate_size": int(intermediate), "num_hidden_layers": v.depth,
        "num_attention_heads": v.heads, "image_size": v.image_size, "patch_size": v.patch_size,
        "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu", "attention_dropout": 0.0,
    }
    return HFBlipConfig(text_config=text_config, vision_config=vision_config,
                        image_text_hidden_size=config.embed_dim, label_smoothing=config.label_smoothing,
                        architectures=[architecture], capfilt_config=to_dict(config))


def _count(state: Mapping[str, Tensor], prefix: str) -> int:
    """Number of numbered children under `prefix` (e.g. `visual_encoder.blocks.`)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def infer_official_config(state: Mapping[str, Tensor], overrides: Mapping[str, Any] | None = None) -> BlipConfig:
    """Sizes of an official checkpoint from its shapes, on top of the `base` (or, at width 1024,
    `large`) preset; `overrides` (dotted keys) win. Raises ValueError naming what is absent."""
    if "visual_encoder.cls_token" not in state:
        raise ValueError("no visual_encoder.cls_token: not an official BLIP checkpoint")
    width = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    values: dict[str, Any] = {
        "vision.width": width, "vision.patch_size": patch, "vision.image_size": grid * patch,
        "vision.depth": _count(state, "visual_encoder.blocks."), "vision.heads": max(1, width // HEAD_DIM),
        "vision.mlp_ratio": state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
    }
    text = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
    words = state.get(text + "embeddings.word_embeddings.weight")
    if words is None:
        raise ValueError("no text_encoder.* or text_decoder.bert.* word embeddings in the checkpoint")
    hidden = words.shape[1]
    values |= {
        "text.vocab_size": words.shape[0], "text.hidden_size": hidden,
        "text.num_layers": _count(state, text + "encoder.layer."), "text.num_heads": max(1, hidden // HEAD_DIM),
        "text.intermediate_size": state[text + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        "text.max_position_embeddings": state[text + "embeddings.position_embeddings.weight"].shape[0],
    }
    if "vision_proj.weight" in state:
        values["embed_dim"] = state["vision_proj.weight"].shape[0]
    if "image_queue" in state:
        values["queue_size"] = state["image_queue"].shape[1]
    values.update(overrides or {})
    return resolve_config("large" if width == 1024 else "base", values)
