"""`capfilt convert` and `capfilt export`: BLIP checkpoints in, capfilt model directories out, and back.

`convert` reads an official BLIP `.pth` (only its `['model']` entry, with `weights_only=True`) or a
transformers `save_pretrained` directory of `BlipForConditionalGeneration` (-> a captioner) or
`BlipForImageTextRetrieval` (-> a filter), fits the weights onto a capfilt model with
`models.convert` (every unfitting key named), and writes a model directory through
`components.checkpoints.save_model_dir` (config.json + model.safetensors + tokenizer.json).
Official checkpoints carry no tokenizer, so `--tokenizer` points at a BERT tokenizer folder;
`[DEC]`/`[ENC]` are added when absent, as BLIP's `init_tokenizer` does. `export` writes a
captioner or filter as a transformers-loadable directory with its tokenizer and image processor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from components.checkpoints import read_model_config, read_state_dict, save_model_dir
from components.errors import CapfiltError
from components.model_io import (MODEL_CLASSES, apply_model_overrides, load_any_tokenizer,
                                 model_class_name, special_ids, write_tokenizer_dir)
from models.config import BlipConfig, from_dict, to_dict
from models.convert import ConversionError, Converted, capfilt_to_hf, hf_to_capfilt, official_to_capfilt
from models.convert_config import capfilt_config_to_hf, hf_config_to_capfilt, infer_official_config

log = logging.getLogger(__name__)

Source = Literal["official", "hf"]
Target = Literal["auto", "pretrain", "captioner", "filter"]
HF_TARGETS = {"BlipForConditionalGeneration": "captioner", "BlipForImageTextRetrieval": "filter"}
EXPORT_ARCH = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}


@dataclass(frozen=True)
class ConvertSummary:
    """What `convert` wrote and what it had to do besides renaming."""

    out: Path
    model_class: str
    converted: Converted

    def describe(self) -> str:
        c = self.converted
        lines = [f"{self.out}: {self.model_class}, {len(c.state)} tensors"]
        for label, keys in (("dropped", c.dropped), ("initialised", c.filled), ("resized", c.resized)):
            if keys:
                lines.append(f"  {label} ({len(keys)}): " + ", ".join(keys[:6]) + (" ..." if len(keys) > 6 else ""))
        return "\n".join(lines)


def load_official_state(path: Path) -> dict[str, Tensor]:
    """The `['model']` state dict of an official `.pth` (plain state dicts are accepted too)."""
    if not path.is_file():
        raise CapfiltError(f"{path}: not found")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CapfiltError(f"{path}: not a loadable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    state = blob.get("model", blob) if isinstance(blob, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CapfiltError(f"{path}: expected {{'model': state_dict}} as BLIP saves it")
    return dict(state)


def _auto_target(state: Mapping[str, Tensor], path: Path) -> str:
    has_dec = any(k.startswith("text_decoder.") for k in state)
    has_enc = any(k.startswith("text_encoder.") for k in state)
    if has_dec and has_enc:
        return "pretrain"
    if has_dec or has_enc:
        return "captioner" if has_dec else "filter"
    raise CapfiltError(f"{path}: holds neither text_encoder.* nor text_decoder.* weights")


def _fit(model_cls: type[nn.Module], config: BlipConfig, state: Mapping[str, Tensor], source: Source,
         where: Path) -> tuple[nn.Module, Converted]:
    model = model_cls(config)
    fitter = official_to_capfilt if source == "official" else hf_to_capfilt
    try:
        converted = fitter(state, model.state_dict())
    except ConversionError as exc:
        raise CapfiltError(f"{where}: does not fit {model_cls.__name__}: {exc}") from None
    model.load_state_dict(converted.state, strict=True)
    return model, converted


def _with_image_size(config: BlipConfig, image_size: int | None) -> BlipConfig:
    if image_size is None or image_size == config.vision.image_size:
        return config
    return from_dict(to_dict(dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                                   image_size=image_size))))


def _official(src: Path, target: Target, tokenizer_dir: Path | None,
              overrides: Mapping[str, Any]) -> tuple[str, BlipConfig, dict[str, Tensor], Any]:
    if tokenizer_dir is None:
        raise CapfiltError(f"{src}: official checkpoints carry no tokenizer; pass --tokenizer DIR "
                           "(a BERT tokenizer folder with tokenizer.json or vocab.txt)")
    state = load_official_state(src)
    tokenizer = load_any_tokenizer(tokenizer_dir)
    kind = _auto_target(state, src) if target == "auto" else target
    ids = {f"text.{k}": v for k, v in special_ids(tokenizer, tokenizer_dir).items()}
    try:
        config = infer_official_config(state, {**ids, **overrides})
    except (ValueError, KeyError) as exc:
        raise CapfiltError(f"{src}: cannot read the model sizes: {exc}") from None
    return kind, config, state, tokenizer


def _hf(src: Path, target: Target, overrides: Mapping[str, Any]) -> tuple[str, BlipConfig, dict[str, Tensor], Any]:
    from transformers import BlipConfig as HFBlipConfig

    if not (src / "config.json").is_file():
        raise CapfiltError(f"{src / 'config.json'}: not found; expected a transformers save_pretrained folder")
    try:
        hf_config = HFBlipConfig.from_pretrained(src)
    except (OSError, ValueError, TypeError) as exc:
        raise CapfiltError(f"{src / 'config.json'}: not a BLIP config ({exc})") from None
    arch = (hf_config.architectures or ["?"])[0]
    if arch not in HF_TARGETS:
        raise CapfiltError(f"{src / 'config.json'}: architecture {arch} is not supported; "
                           f"use one of {sorted(HF_TARGETS)}")
    kind = HF_TARGETS[arch]
    if target not in ("auto", kind):
        raise CapfiltError(f"{src}: a {arch} converts to a {kind}, not a {target}")
    tokenizer = load_any_tokenizer(src)
    ids = special_ids(tokenizer, src)
    try:
        config = hf_config_to_capfilt(hf_config, ids["cls_token_id"], ids["enc_token_id"])
        config = apply_model_overrides(config, overrides)
    except ValueError as exc:
        raise CapfiltError(f"{src / 'config.json'}: {exc}") from None
    return kind, config, load_hf_state(src), tokenizer


def load_hf_state(src: Path) -> dict[str, Tensor]:
    """The weights of a save_pretrained folder (single or sharded safetensors, or pytorch_model.bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(src.glob("model*.safetensors"))
    try:
        if files:
            state: dict[str, Tensor] = {}
            for f in files:
                state.update(load_file(f))
            return state
        if (src / "pytorch_model.bin").is_file():
            return load_official_state(src / "pytorch_model.bin")
    except (SafetensorError, OSError) as exc:
        raise CapfiltError(f"{src}: unreadable weights ({exc})") from None
    raise CapfiltError(f"{src}: no model.safetensors or pytorch_model.bin")


def convert(src: Path, source: Source, out: Path, tokenizer_dir: Path | None = None, target: Target = "auto",
            image_size: int | None = None, overrides: Mapping[str, Any] | None = None) -> ConvertSummary:
    """Convert an official or HF BLIP checkpoint into a capfilt model directory at `out`."""
    src, overrides = Path(src), dict(overrides or {})
    if source == "official":
        kind, config, state, tokenizer = _official(src, target, tokenizer_dir, overrides)
    elif source == "hf":
        kind, config, state, tokenizer = _hf(src, target, overrides)
    else:
        raise CapfiltError(f"unknown source layout {source!r}; use official or hf")
    config = _with_image_size(config, image_size)
    if tokenizer.get_vocab_size() > config.text.vocab_size:
        raise CapfiltError(f"{src}: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
                           f"only {config.text.vocab_size} word embeddings")
    model, converted = _fit(MODEL_CLASSES[kind], config, state, source, src)
    for label, keys in (("dropped", converted.dropped), ("initialised", converted.filled),
                        ("resized", converted.resized)):
        if keys:
            log.info("%s %d keys: %s", label, len(keys), ", ".join(keys))
    with tempfile.TemporaryDirectory(prefix=".capfilt-tok-") as tok_dir:
        write_tokenizer_dir(tokenizer, Path(tok_dir))
        save_model_dir(out, model, to_dict(config), tok_dir)
    return ConvertSummary(Path(out), type(model).__name__, converted)


def export_hf(model_dir: Path, out: Path, part: Literal["auto", "captioner", "filter"] = "auto") -> Path:
    """Write a capfilt captioner or filter (or one side of a pre-training model) as a transformers
    `save_pretrained` folder with tokenizer and image processor; returns `out`."""
    model_dir, out = Path(model_dir), Path(out)
    cls_name = model_class_name(model_dir)
    kinds = {"BlipCaptioner": "captioner", "BlipFilter": "filter"}
    if cls_name == "BlipPretrain":
        if part == "auto":
            raise CapfiltError(f"{model_dir}: a pre-training model holds both a captioner and a filter; "
                               "pass --part captioner or --part filter")
        kind = part
    elif cls_name in kinds:
        kind = kinds[cls_name]
        if part not in ("auto", kind):
            raise CapfiltError(f"{model_dir}: a {cls_name} has no {part} part")
    else:
        raise CapfiltError(f"{model_dir / 'config.json'}: cannot export a {cls_name}")
    try:
        config = from_dict(read_model_config(model_dir))
    except ValueError as exc:
        raise CapfiltError(f"{model_dir / 'config.json'}: {exc}") from None
    arch = EXPORT_ARCH[kind]
    hf_config = capfilt_config_to_hf(config, arch)
    try:
        exported = capfilt_to_hf(read_state_dict(model_dir), arch)
    except ConversionError as exc:
        raise CapfiltError(f"{model_dir}: {exc}") from None
    _check_hf_keys(exported.state, hf_config, arch, model_dir)
    _write_hf_dir(out, exported.state, hf_config, model_dir, config.vision.image_size)
    return out


def _check_hf_keys(state: Mapping[str, Tensor], hf_config: Any, arch: str, where: Path) -> None:
    """Every key and shape of the transformers class, nothing else (built on the meta device)."""
    import transformers

    with torch.device("meta"):
        reference = getattr(transformers, arch)(hf_config).state_dict()
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    shapes = sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
    if missing or unexpected or shapes:
        raise CapfiltError(f"{where}: does not fit {arch}: missing {missing}, unexpected {unexpected}, "
                           f"wrong shape {shapes}")


def _write_hf_dir(out: Path, state: Mapping[str, Tensor], hf_config: Any, model_dir: Path, image_size: int) -> None:
    from safetensors.torch import save_file
    from transformers import BlipImageProcessor

    from components.data import CLIP_MEAN, CLIP_STD
    from components.tokenizer import load_tokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_config.save_pretrained(tmp)
        tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        hf_tokenizer(load_tokenizer(model_dir)).save_pretrained(tmp)
        BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                           image_std=list(CLIP_STD)).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_tokenizer(tokenizer: Any) -> Any:
    """A transformers tokenizer around a `tokenizers.Tokenizer` with BLIP's special tokens:
    `[DEC]` is bos, `[ENC]` an extra special token (transformers 5: `extra_special_tokens`)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                   bos_token="[DEC]", extra_special_tokens=["[ENC]"])
