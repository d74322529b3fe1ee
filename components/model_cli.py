"""The model sub-commands of `capfilt`: convert, export, caption, match.

Kept apart from `components/cli.py` so that file only wires them in. Handlers import their
component lazily (torch and transformers load only when a model command runs), print results
on stdout (JSON lines for caption and match) and let `CapfiltError` reach the CLI's handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _cmd_convert(args: argparse.Namespace) -> int:
    from components.convert import convert
    from components.model_io import parse_overrides

    summary = convert(Path(args.src), args.source, Path(args.out),
                      tokenizer_dir=Path(args.tokenizer) if args.tokenizer else None, target=args.target,
                      image_size=args.image_size, overrides=parse_overrides(args.set))
    print(summary.describe())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from components.convert import export_hf

    print(export_hf(Path(args.model_dir), Path(args.out), part=args.part))
    return 0


def _cmd_caption(args: argparse.Namespace) -> int:
    from components.predict import CaptionOptions, caption_images

    options = CaptionOptions(decoding=args.decoding, num_beams=args.num_beams, top_p=args.top_p,
                             max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                             prompt=args.prompt, seed=args.seed, repetition_penalty=args.repetition_penalty,
                             batch_size=args.batch_size)
    for row in caption_images(Path(args.checkpoint), [Path(p) for p in args.images], options, args.device):
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    from components.predict import match_texts

    for row in match_texts(Path(args.checkpoint), Path(args.image), args.text, args.device):
        print(json.dumps(row, ensure_ascii=False))
    return 0


def add_model_commands(sub: argparse._SubParsersAction) -> None:
    """Register convert, export, caption and match on the `capfilt` sub-parsers."""
    p = sub.add_parser("convert", help="official BLIP .pth or transformers BLIP folder -> capfilt model dir")
    p.add_argument("src", metavar="SRC", help="official .pth file, or a transformers save_pretrained folder")
    p.add_argument("--from", dest="source", required=True, choices=["official", "hf"], help="layout of SRC")
    p.add_argument("--out", required=True, help="model directory to write (replaced only on success)")
    p.add_argument("--tokenizer", default=None,
                   help="BERT tokenizer folder (official checkpoints carry none; [DEC]/[ENC] are added)")
    p.add_argument("--target", default="auto", choices=["auto", "pretrain", "captioner", "filter"],
                   help="capfilt model to build (auto: from the weights / HF architecture)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the ViT position table to this image size (bicubic)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, e.g. text.num_heads=12 (repeatable)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="capfilt model dir -> transformers BLIP folder (+ tokenizer)")
    p.add_argument("model_dir", metavar="DIR", help="capfilt model directory")
    p.add_argument("--to", dest="layout", required=True, choices=["hf"], help="target layout")
    p.add_argument("--out", required=True, help="folder to write (replaced only on success)")
    p.add_argument("--part", default="auto", choices=["auto", "captioner", "filter"],
                   help="which side of a pre-training model to export")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("caption", help="caption images with a captioner; one JSON line per image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--checkpoint", required=True, help="captioner (or pre-training) model directory")
    p.add_argument("--decoding", default="beam", choices=["greedy", "beam", "nucleus"])
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass (nucleus decoding)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--min-new-tokens", type=int, default=1)
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="default: 1.1 for nucleus (as BLIP), 1.0 otherwise")
    p.add_argument("--prompt", default="a picture of ", help='decoder prompt, removed from the output ("" for none)')
    p.add_argument("--seed", type=int, default=0, help="nucleus sampling seed")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.set_defaults(func=_cmd_caption)

    p = sub.add_parser("match", help="score texts against an image (ITM probability, ITC cosine)")
    p.add_argument("--checkpoint", required=True, help="filter (or pre-training) model directory")
    p.add_argument("--image", required=True)
    p.add_argument("--text", nargs="+", required=True, metavar="TEXT")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=_cmd_match)
