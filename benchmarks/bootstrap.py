"""Bootstrap throughput: capfilt's CapFilt pass against a straightforward transformers BLIP loop.

Both sides do the whole per-image work of the bootstrap stage on the same web shard: decode the
PNG, resize + normalise, caption it with nucleus sampling ("a picture of " prompt, top-p 0.9,
repetition penalty 1.1, top_k off), then score the web text and the synthetic caption with ITM.
capfilt runs `components.bootstrap.process_shard` (each ViT encodes an image once, ITM shares the
image keys/values across both texts, per-image seeded sampling); transformers runs
`BlipForConditionalGeneration.generate` and two `BlipForImageTextRetrieval` forwards per batch.
The transformers models have random weights (peaked LM head, as `benchmarks/caption.py` builds
them) and are converted into capfilt with `models.convert`, so both sides run identical weights
and configs. Runs alternate; the best of the rounds is kept. capfilt also runs with
`bootstrap.precision: bf16` (bf16 weights and autocast on the CPU too) against transformers in
fp32, as a straightforward loop would run, and against transformers with its weights in bf16.
The last line is one JSON object with images/s of each side, `ratio` = capfilt (default
precision) / transformers, `ratio_bf16` (capfilt bf16 / transformers fp32), `ratio_bf16_both`
and `ceiling`: the transformers loop's time over the time of the work any CapFilt pass must do
(decode each image, run the captioner's and the filter's ViT once, fp32) — the most `ratio` could
be if generation and ITM cost nothing.
`cpu_native_bf16` says whether the CPU has AVX512-BF16 or AMX; without them PyTorch emulates bf16
and the bf16 figures measure the emulation.
`--scaling` adds capfilt alone on 1x, 2x and 4x the images (seconds, peak memory growth).
Usage: `python benchmarks/bootstrap.py [--quick] [--presets tiny base] [--threads N] [--scaling]`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import importlib.util
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import torch
from PIL import Image

from components.batch_inference import Images, Loaded, for_inference, inference_dtype, tokenize
from components.bootstrap import Models, process_shard
from components.config import BootstrapConfig, TokenizerConfig
from components.hardware import cpu_native_bf16
from components.shards import ShardWriter
from components.tokenizer import train_tokenizer
from models.config import resolve_config

WORDS = ("red", "green", "blue", "small", "large", "square", "ring", "cross", "top", "left", "right")


def _caption_bench():
    spec = importlib.util.spec_from_file_location("caption_bench", Path(__file__).with_name("caption.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def web_shard(folder: Path, n: int, size: int) -> pd.DataFrame:
    """n random PNGs in one shard, one web text each: the rows `process_shard` takes."""
    rng = np.random.default_rng(0)
    writer, rows = ShardWriter(folder, max_count=n), []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        shard = writer.add(f"{i:06d}", {"png": buf.getvalue()})
        text = " ".join(rng.choice(WORDS, 6))
        rows.append({"sample_id": f"img{i}#0", "image_key": f"img{i}", "caption": text, "shard": shard,
                     "member": f"{i:06d}.png", "sha": hashlib.sha256(buf.getvalue()).hexdigest()})
    writer.close()
    return pd.DataFrame(rows)


@functools.lru_cache(maxsize=None)  # `--scaling` reuses the pair `bench` built
def build(preset: str, quick: bool) -> tuple[str, Any, Any, dict[str, tuple[Any, Any]]]:
    """(label, tokenizer, config, {arch: (hf, capfilt)}) with special ids from a toy tokenizer."""
    tok = train_tokenizer([" ".join(WORDS), "a picture of"], TokenizerConfig(vocab_size=200))
    ids = {f"text.{k}": tok.token_to_id(v) for k, v in (("pad_token_id", "[PAD]"), ("cls_token_id", "[CLS]"),
           ("sep_token_id", "[SEP]"), ("bos_token_id", "[DEC]"), ("enc_token_id", "[ENC]"))}
    over = dict(ids)
    if preset == "base":
        over.update({"vision.depth": 4, "text.num_layers": 4, "vision.image_size": 224} if quick
                    else {"vision.image_size": 384})
    over["text.vocab_size"] = 1000 if preset == "tiny" else 30524
    config = resolve_config(preset, over)
    label = preset if preset == "tiny" else ("base-d4-224px" if quick else "base-384px")
    return label, tok, config, _caption_bench().build_pair(config, seed=0)


def hf_loop(hf_cap: Any, hf_itm: Any, tok: Any, rows: pd.DataFrame, root: Path, size: int, batch: int,
            dev: torch.device) -> list[float]:
    """The straightforward loop: generate, decode, then one retrieval forward per text kind."""
    images, scores = Images(root), []
    prompt = torch.tensor(tok.encode("a picture of ").ids)  # [CLS] a picture of [SEP], as HF's processor
    text_cfg = BootstrapConfig().text
    for s in range(0, len(rows), batch):
        chunk = rows.iloc[s : s + batch]
        pixels = images.tensor(images.load(chunk["shard"].tolist(), chunk["member"].tolist()), size, dev)
        pixels = pixels.to(next(hf_cap.parameters()).dtype)  # a bf16 model takes bf16 pixels
        with torch.inference_mode():
            out = hf_cap.generate(pixel_values=pixels, input_ids=prompt.repeat(len(chunk), 1).to(dev),
                                  do_sample=True, top_p=0.9, top_k=0, repetition_penalty=1.1,
                                  max_new_tokens=16, min_new_tokens=1)
            synthetic = [t[len("a picture of "):].strip() for t in tok.decode_batch(out.tolist())]
            for texts in (chunk["caption"].tolist(), synthetic):
                ids, mask = tokenize(tok, texts, text_cfg, dev)
                itm = hf_itm(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
                scores += itm.softmax(-1)[:, 1].tolist()
    images.close()
    return scores


def vit_floor(models: Models, rows: pd.DataFrame, images: Images, batch: int) -> None:
    """The work no CapFilt pass with two fine-tuned models can skip: decode and transform each image,
    run the captioner's ViT and the filter's ViT on it once. Its time bounds capfilt's throughput:
    the transformers loop's time over this one is the ratio capfilt would reach if generation and
    ITM cost nothing."""
    with torch.inference_mode():
        for s in range(0, len(rows), batch):
            chunk = rows.iloc[s : s + batch]
            pil = images.load(chunk["shard"].tolist(), chunk["member"].tolist())
            for loaded in (models.captioner, models.filter):
                loaded.model.encode_image(images.tensor(pil, loaded.image_size, models.device))


def _capfilt_models(tok: Any, config: Any, pair: dict[str, tuple[Any, Any]], dev: torch.device,
                    precision: str = "auto") -> Models:
    """capfilt's side of `pair` (the converted captioner and filter) as the bootstrap stage loads it:
    weights stored in the precision's dtype (a copy when that is not fp32, so both sides keep theirs)."""
    size = config.vision.image_size
    cap, itm = pair["BlipForConditionalGeneration"][1].to(dev), pair["BlipForImageTextRetrieval"][1].to(dev)
    if inference_dtype(dev, precision) != torch.float32:
        cap, itm = copy.deepcopy(cap), copy.deepcopy(itm)
    loaded = [for_inference(Loaded(m, tok, "-", size), precision) for m in (cap, itm)]
    return Models(loaded[0], loaded[1], _generation(config), dev, precision)


def bench(preset: str, quick: bool, n: int, batch: int, rounds: int, dev: torch.device) -> dict:
    label, tok, config, pair = build(preset, quick)
    hf_cap = pair["BlipForConditionalGeneration"][0].to(dev)
    hf_itm = pair["BlipForImageTextRetrieval"][0].to(dev)
    hf_cap_bf16, hf_itm_bf16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (hf_cap, hf_itm))
    size = config.vision.image_size
    with tempfile.TemporaryDirectory() as tmp:
        rows = web_shard(Path(tmp), n, size)
        cfg = BootstrapConfig(batch_size=batch, web_manifest=str(Path(tmp) / "manifest.parquet"))
        models = _capfilt_models(tok, config, pair, dev)  # precision auto: fp32 on CPU
        models_bf16 = _capfilt_models(tok, config, pair, dev, "bf16")
        images = Images(Path(tmp))
        shard = rows["shard"].iloc[0]
        sides = {
            "capfilt": lambda: process_shard(shard, rows, cfg, models, images),
            "capfilt_bf16": lambda: process_shard(shard, rows, cfg, models_bf16, images),
            "hf": lambda: hf_loop(hf_cap, hf_itm, tok, rows, Path(tmp), size, batch, dev),
            "hf_bf16": lambda: hf_loop(hf_cap_bf16, hf_itm_bf16, tok, rows, Path(tmp), size, batch, dev),
            "floor": lambda: vit_floor(models, rows, images, batch),
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for fn in sides.values():
            fn()  # warm-up
        for _ in range(rounds):  # alternating, best of the rounds
            for name, fn in sides.items():
                times[name].append(_timed(fn, dev))
        images.close()
    best = {name: min(t) for name, t in times.items()}
    result = {"capfilt_img_s": n / best["capfilt"], "capfilt_bf16_img_s": n / best["capfilt_bf16"],
              "hf_img_s": n / best["hf"], "ratio": best["hf"] / best["capfilt"],
              "ratio_bf16": best["hf"] / best["capfilt_bf16"],
              "hf_bf16_img_s": n / best["hf_bf16"], "ratio_bf16_both": best["hf_bf16"] / best["capfilt_bf16"],
              "floor_share": best["floor"] / best["capfilt"], "ceiling": best["hf"] / best["floor"]}
    print(f"{label:>14} {n} images, batch {batch}: capfilt {result['capfilt_img_s']:8.1f} img/s  "
          f"(bf16 {result['capfilt_bf16_img_s']:8.1f})  transformers {result['hf_img_s']:8.1f} img/s  "
          f"ratio {result['ratio']:.2f}x (bf16 {result['ratio_bf16']:.2f}x; both in bf16: transformers "
          f"{result['hf_bf16_img_s']:.1f} img/s, {result['ratio_bf16_both']:.2f}x)", flush=True)
    print(f"{label:>14} floor (image decode + both ViTs once, fp32): {result['floor_share']:.0%} of capfilt's time; "
          f"ceiling {result['ceiling']:.2f}x if generation and ITM were free", flush=True)
    return {label: result}


class _PeakRSS:
    """Peak resident memory above the level at entry, sampled every 5 ms by a thread."""

    def __enter__(self) -> _PeakRSS:
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def scaling(preset: str, quick: bool, n: int, batch: int, dev: torch.device) -> dict:
    """capfilt alone on n, 2n and 4n images (one shard each, same models): seconds and the peak
    memory growth of each run. Linear time and flat memory are what streaming shards should give."""
    label, tok, config, pair = build(preset, quick)
    size = config.vision.image_size
    models = _capfilt_models(tok, config, pair, dev)
    out: dict[str, dict[str, float]] = {}
    for mult in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            rows = web_shard(Path(tmp), n * mult, size)
            cfg = BootstrapConfig(batch_size=batch, web_manifest=str(Path(tmp) / "manifest.parquet"))
            images = Images(Path(tmp))
            if mult == 1:  # warm-up
                process_shard(rows["shard"].iloc[0], rows.iloc[:batch], cfg, models, images)
            with _PeakRSS() as mem:
                seconds = _timed(lambda: process_shard(rows["shard"].iloc[0], rows, cfg, models, images), dev)
            images.close()
        out[f"{mult}x"] = {"images": n * mult, "seconds": seconds, "peak_growth_mb": mem.growth_mb}
        print(f"{label:>14} scaling {mult}x: {n * mult} images in {seconds:6.2f} s "
              f"({n * mult / seconds:6.1f} img/s), peak memory +{mem.growth_mb:.0f} MB", flush=True)
    out["time_4x_over_1x"] = out["4x"]["seconds"] / out["1x"]["seconds"]
    return out


def _generation(config: Any) -> Any:
    from models.generation import GenerationConfig

    t = config.text
    return GenerationConfig(decoding="nucleus", top_p=0.9, repetition_penalty=1.1, max_new_tokens=16,
                            min_new_tokens=1, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id)


def _timed(fn: Any, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset only, under a minute on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=None, choices=["tiny", "base"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--scaling", action="store_true",
                        help="also time capfilt on 1x, 2x, 4x the images of the first preset (time, peak memory)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    presets = args.presets or (["tiny"] if args.quick else ["tiny", "base"])
    summary: dict = {"device": str(dev), "threads": torch.get_num_threads(), "quick": args.quick,
                     "cpu_native_bf16": cpu_native_bf16(), "results": {}}
    if dev.type == "cpu" and not summary["cpu_native_bf16"]:
        print("this CPU has no AVX512-BF16 or AMX: PyTorch emulates bf16, so the bf16 figures measure the "
              "emulation", flush=True)
    for preset in presets:
        n, batch = (128, 64) if preset == "tiny" else (16, 8)
        summary["results"].update(bench(preset, args.quick, n if not args.quick else n // 2 * 2, batch,
                                        1 if args.quick else 3, dev))
    if args.scaling:
        n, batch = (64, 32) if presets[0] == "tiny" else (8, 8)
        summary["scaling"] = scaling(presets[0], args.quick, n, batch, dev)
    summary["ratio"] = min(r["ratio"] for r in summary["results"].values())
    summary["ratio_bf16"] = min(r["ratio_bf16"] for r in summary["results"].values())
    summary["ratio_bf16_both"] = min(r["ratio_bf16_both"] for r in summary["results"].values())
    summary["ceiling"] = min(r["ceiling"] for r in summary["results"].values())
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
