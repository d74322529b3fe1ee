"""Shared plumbing of the model commands (convert, export, caption, match): which capfilt class a
model directory holds, tokenizers from any BERT-style folder, and dotted model-config overrides.

Tokenizers are handled as `tokenizers.Tokenizer` objects (what capfilt's `tokenizer.json` is). A
folder with a `tokenizer.json` is read directly, a `vocab.txt` alone becomes a lower-casing BERT
WordPiece tokenizer (bert-base-uncased), anything else goes through `transformers.AutoTokenizer`,
offline. `[DEC]` and `[ENC]` are added as
special tokens when absent, as BLIP's `init_tokenizer` does (looked up with `token_to_id`, never
through `additional_special_tokens`, which transformers 5 renamed to `extra_special_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from components.checkpoints import load_model_dir
from components.errors import CapfiltError
from components.tokenizer import TOKENIZER_FILE, save_tokenizer
from models.blip import BlipCaptioner, BlipFilter, BlipPretrain
from models.config import BlipConfig, from_dict, to_dict

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "pretrain": BlipPretrain, "captioner": BlipCaptioner, "filter": BlipFilter,
}
SPECIAL_TOKENS = {"pad_token_id": "[PAD]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]",
                  "bos_token_id": "[DEC]", "enc_token_id": "[ENC]"}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["text.num_heads=8", ...]` -> {"text.num_heads": 8}; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CapfiltError(f"--set {item!r}: expected KEY=VALUE, e.g. text.num_heads=12")
        out[key.strip()] = yaml.safe_load(value)
    return out


def apply_model_overrides(config: BlipConfig, overrides: Mapping[str, Any]) -> BlipConfig:
    """Dotted overrides on a config; unknown keys and wrong types raise ValueError naming the key."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"unknown model config key {dotted!r}")
            node = node[part]
        if leaf not in node or isinstance(node[leaf], dict):
            raise ValueError(f"unknown model config key {dotted!r}")
        node[leaf] = value
    return from_dict(data)


def load_any_tokenizer(folder: Path) -> Any:
    """A `tokenizers.Tokenizer` from `folder`, with `[DEC]` and `[ENC]` present."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CapfiltError(f"{folder}: tokenizer folder not found")
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_FILE
    try:
        if path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
        elif (folder / "vocab.txt").is_file():  # bert-base-uncased style: lower case, WordPiece
            from transformers import BertTokenizer

            lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
            tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(lines)}).backend_tokenizer
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
        raise CapfiltError(f"{folder}: no readable tokenizer ({str(exc).splitlines()[0]})") from None
    missing = [t for t in ("[DEC]", "[ENC]") if tokenizer.token_to_id(t) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return tokenizer


def special_ids(tokenizer: Any, where: Path) -> dict[str, int]:
    """The model-config token ids (`pad_token_id`, ..., `enc_token_id`) from the tokenizer."""
    ids = {key: tokenizer.token_to_id(token) for key, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[k] for k, v in ids.items() if v is None]
    if missing:
        raise CapfiltError(f"{where}: the tokenizer lacks {', '.join(missing)}")
    return ids


def write_tokenizer_dir(tokenizer: Any, folder: Path) -> Path:
    """`folder/tokenizer.json`, as capfilt model directories hold it."""
    return save_tokenizer(tokenizer, Path(folder))


def model_class_name(model_dir: Path) -> str:
    """The `class` recorded in a model directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        return str(json.loads(path.read_text())["class"])
    except FileNotFoundError:
        raise CapfiltError(f"{path}: not found; is {model_dir} a capfilt model directory?") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CapfiltError(f"{path}: not a capfilt model config ({exc})") from None


def load_model(model_dir: Path, allowed: tuple[str, ...]) -> nn.Module:
    """The model of a directory when its class is one of `allowed` kinds (e.g. captioner, pretrain)."""
    name = model_class_name(model_dir)
    by_name = {cls.__name__: kind for kind, cls in MODEL_CLASSES.items()}
    if by_name.get(name) not in allowed:
        wanted = " or ".join(MODEL_CLASSES[k].__name__ for k in allowed)
        raise CapfiltError(f"{Path(model_dir) / 'config.json'}: holds a {name}; this command needs a {wanted}")
    return load_model_dir(model_dir, MODEL_CLASSES[by_name[name]]).eval()
