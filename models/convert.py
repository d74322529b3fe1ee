"""Weight conversion between the official BLIP layout, Hugging Face BLIP and capfilt's models.

Pure functions: state dicts (and config dicts) in, state dicts out, no I/O. capfilt's parameter
names are the official ones, so official <-> capfilt is nearly the identity: the persistent
`*.embeddings.position_ids` buffers are dropped (or added back), and whole modules the target lacks
are dropped, which is how a tied pre-training model is decoupled into a captioner and a filter.
Hugging Face renames the ViT (`vision_model.*`, see `VISION_TO_HF`) and keeps the text names.
Every conversion is checked against the target model's own state dict (`reference`): a key of an
unknown module, a key a known module does not have, a missing key or a wrong shape raises
`ConversionError` listing every such key by name. Keys the target can initialise itself (momentum
copies from their online twin, fresh queues and temperature, tied aliases from their twin) are
filled and reported, as are dropped keys and position tables resized to the target grid.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from models.vit import interpolate_pos_embed

# One table, both directions: (capfilt / official name, Hugging Face name); {i} is a block index,
# {j} a norm index; a name ending in "." renames a prefix, any other name matches exactly.
_VISION_NAMES: tuple[tuple[str, str], ...] = (
    ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
    ("visual_encoder.blocks.{i}.norm{j}.", "vision_model.encoder.layers.{i}.layer_norm{j}."),
    ("visual_encoder.blocks.{i}.attn.qkv.", "vision_model.encoder.layers.{i}.self_attn.qkv."),
    ("visual_encoder.blocks.{i}.attn.proj.", "vision_model.encoder.layers.{i}.self_attn.projection."),
    ("visual_encoder.blocks.{i}.mlp.", "vision_model.encoder.layers.{i}.mlp."),
    ("visual_encoder.norm.", "vision_model.post_layernorm."),
)


def _rename_rule(src: str, dst: str) -> tuple[str, str]:
    """A (regex, replacement) pair that rewrites `src`-style keys into `dst`-style keys."""
    pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d)")
    pattern = "^" + pattern + ("" if src.endswith(".") else "$")
    return pattern, dst.replace("{i}", r"\g<i>").replace("{j}", r"\g<j>")


VISION_TO_HF = tuple(_rename_rule(ours, hf) for ours, hf in _VISION_NAMES)
HF_TO_VISION = tuple(_rename_rule(hf, ours) for ours, hf in _VISION_NAMES)

# Every top-level module/buffer an official BLIP checkpoint (pretrain, caption, retrieval, ITM) holds.
OFFICIAL_MODULES = frozenset({
    "visual_encoder", "visual_encoder_m", "text_encoder", "text_encoder_m", "text_decoder",
    "vision_proj", "vision_proj_m", "text_proj", "text_proj_m", "itm_head",
    "temp", "image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue",
})
# What the HF heads keep per architecture (after the vision rename, in capfilt names).
HF_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "BlipForConditionalGeneration": ("visual_encoder", "text_decoder"),
    "BlipForImageTextRetrieval": ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head"),
}
# Keys a target initialises itself when the source lacks them (queues, pointers, temperature).
FRESH_KEYS = frozenset({"temp", "image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue"})
QUEUE_KEYS = frozenset({"image_queue", "text_queue", "idx_queue"})
POS_EMBED_KEYS = frozenset({"visual_encoder.pos_embed", "visual_encoder_m.pos_embed"})
POSITION_IDS = "embeddings.position_ids"


class ConversionError(ValueError):
    """A state dict that does not fit its target; the message lists every offending key."""


@dataclass(frozen=True)
class Converted:
    """A state dict in the target layout and what the conversion did besides renaming."""

    state: dict[str, Tensor]
    dropped: tuple[str, ...] = ()  # source keys of modules the target does not have
    filled: tuple[str, ...] = ()  # target keys the source lacks, initialised by the conversion
    resized: tuple[str, ...] = ()  # position tables interpolated to the target's grid


def rename(key: str, rules: Iterable[tuple[str, str]]) -> str:
    """The first matching rule applied to `key` (unchanged when none matches)."""
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def module_of(key: str) -> str:
    """Top-level module (or buffer) name of a state-dict key."""
    return key.split(".", 1)[0]


def _online_twin(key: str) -> str | None:
    """`visual_encoder_m.x` -> `visual_encoder.x`; None for non-momentum keys."""
    head, _, rest = key.partition(".")
    return f"{head[:-2]}.{rest}" if head.endswith("_m") and rest else None


def _shared_groups(reference: Mapping[str, Tensor]) -> list[list[str]]:
    """Keys of the reference that are one tensor under several names (tied weights)."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for key, value in reference.items():
        if value.numel():
            ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
            groups.setdefault(ident, []).append(key)
    return [sorted(keys) for keys in groups.values() if len(keys) > 1]


def _shown(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _place(state: dict[str, Tensor], reference: Mapping[str, Tensor],
           sorted_out: dict[str, list[str]]) -> dict[str, Tensor]:
    """Source keys the target has, with resized position tables; sorts the rest into
    `dropped` (module absent from the target) / `unexpected` / `shape` / `fresh` lists."""
    target_modules = {module_of(k) for k in reference}
    placed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key not in reference:
            known = module_of(key) not in target_modules
            sorted_out["dropped" if known else "unexpected"].append(key)
            continue
        want = reference[key].shape
        if value.shape != want and key in POS_EMBED_KEYS and value.dim() == 3 and value.shape[2] == want[2]:
            value = interpolate_pos_embed(value, int(round((want[1] - 1) ** 0.5)))
            sorted_out["resized"].append(key)
        if value.shape != want:
            if key in QUEUE_KEYS:  # another queue length: start a fresh queue
                sorted_out["dropped"].append(key)
                continue
            sorted_out["shape"].append(f"{key} {tuple(value.shape)} (target {tuple(want)})")
            continue
        placed[key] = value
    return placed


def _fill(placed: dict[str, Tensor], reference: Mapping[str, Tensor], filled: list[str]) -> list[str]:
    """Fill tied aliases, momentum copies and fresh buffers; returns the keys still missing."""
    for group in _shared_groups(reference):
        present = [k for k in group if k in placed]
        for key in present[1:]:
            if not torch.equal(placed[key], placed[present[0]]):
                raise ConversionError(f"{key} and {present[0]} are one tied tensor in the target "
                                      "but differ in the source")
        for key in group:
            if key not in placed and present:
                placed[key] = placed[present[0]]
                filled.append(key)
    missing = []
    for key in reference:
        if key in placed:
            continue
        twin = _online_twin(key)
        if twin is not None and twin in placed:
            placed[key] = placed[twin].clone()  # BLIP's copy_params: momentum starts as the online model
        elif key in FRESH_KEYS:
            placed[key] = reference[key].clone()
        else:
            missing.append(key)
            continue
        filled.append(key)
    return missing


def fit_state(state: Mapping[str, Tensor], reference: Mapping[str, Tensor],
              dropped: Iterable[str] = ()) -> Converted:
    """Fit a state dict already in capfilt names onto the target whose state dict is `reference`.

    Raises ConversionError naming every unexpected, missing or mis-shaped key.
    """
    sorted_out: dict[str, list[str]] = {"dropped": list(dropped), "unexpected": [], "shape": [], "resized": []}
    placed = _place(dict(state), reference, sorted_out)
    filled: list[str] = []
    missing = _fill(placed, reference, filled)
    problems = [f"{label} keys: {_shown(keys)}" for label, keys in
                (("unexpected", sorted_out["unexpected"]), ("missing", missing), ("wrong-shape", sorted_out["shape"]))
                if keys]
    if problems:
        raise ConversionError("; ".join(problems))
    return Converted({k: placed[k] for k in reference}, tuple(sorted(sorted_out["dropped"])),
                     tuple(sorted(filled)), tuple(sorted(sorted_out["resized"])))


def official_to_capfilt(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Converted:
    """An official BLIP `['model']` state dict (any of BLIP_Pretrain, BLIP_Decoder, BLIP_Retrieval,
    BLIP_ITM) fitted onto the capfilt model whose state dict is `reference`."""
    unknown = sorted(k for k in state if module_of(k) not in OFFICIAL_MODULES)
    if unknown:
        raise ConversionError(f"not an official BLIP layout; unexpected keys: {_shown(unknown)}")
    ids = [k for k in state if k.endswith(POSITION_IDS)]
    kept = {k: v for k, v in state.items() if not k.endswith(POSITION_IDS)}
    return fit_state(kept, reference, dropped=ids)


def capfilt_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A capfilt state dict in the official layout: the same names plus the persistent
    `position_ids` buffers (1, max_positions) of every text module."""
    out = dict(state)
    suffix = "embeddings.position_embeddings.weight"
    for key, value in state.items():
        if key.endswith(suffix):
            out[key[: -len(suffix)] + POSITION_IDS] = torch.arange(value.shape[0]).unsqueeze(0)
    return out


def hf_to_capfilt(state: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Converted:
    """A transformers `BlipForConditionalGeneration` / `BlipForImageTextRetrieval` state dict fitted
    onto the capfilt model whose state dict is `reference` (tied keys HF did not save are filled)."""
    known = {m for mods in HF_ARCHITECTURES.values() for m in mods} | {"vision_model"}
    unknown = sorted(k for k in state if module_of(k) not in known)
    if unknown:
        raise ConversionError(f"not a BlipForConditionalGeneration / BlipForImageTextRetrieval state "
                              f"dict; unexpected keys: {_shown(unknown)}")
    ids = [k for k in state if k.endswith(POSITION_IDS)]
    renamed = {}
    for key, value in state.items():
        if key.endswith(POSITION_IDS):
            continue
        new = rename(key, HF_TO_VISION)
        if module_of(key) == "vision_model" and new == key:
            raise ConversionError(f"unexpected key {key}: no capfilt ViT counterpart")
        renamed[new] = value
    return fit_state(renamed, reference, dropped=ids)


def capfilt_to_hf(state: Mapping[str, Tensor], architecture: str) -> Converted:
    """The part of a capfilt state dict that `architecture` holds, in transformers names.
    Momentum copies, queues and `temp` have no HF counterpart and are reported as dropped."""
    if architecture not in HF_ARCHITECTURES:
        raise ConversionError(f"unknown Hugging Face architecture {architecture!r}; "
                              f"choose one of {sorted(HF_ARCHITECTURES)}")
    modules = HF_ARCHITECTURES[architecture]
    out, dropped = {}, []
    for key, value in state.items():
        if module_of(key) not in modules:
            dropped.append(key)
            continue
        out[rename(key, VISION_TO_HF)] = value.detach().clone()
    absent = [m for m in modules if not any(module_of(k) == m for k in state)]
    if absent:
        raise ConversionError(f"{architecture} needs modules the model lacks: {', '.join(absent)}")
    return Converted(out, tuple(sorted(dropped)))
