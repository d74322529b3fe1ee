"""Captioning and ITM throughput: capfilt's generation and filter scoring against transformers BLIP.

One random-weight transformers model per preset (`BlipForConditionalGeneration`, and
`BlipForImageTextRetrieval` for ITM) is converted into capfilt with `models.convert`, so both
sides run the same weights and config in the same process. The random captioner's LM-head
LayerNorm gain is scaled up (`PEAK`) so its next-token distributions are as confident as a
trained model's; with flat random logits every nucleus would span the whole vocabulary. Captioning: nucleus sampling
(top-p 0.9, repetition penalty 1.1, HF `top_k=0` so both are pure nucleus) and beam search
(3 beams), at the same `max_new_tokens`/`min_new_tokens`, batch 1, 8 and 32; capfilt uses
`models.generation.generate`, transformers `BlipForConditionalGeneration.generate`. ITM: two
texts per image, capfilt encodes the image once (`itm_scores` over shared image keys/values),
transformers runs two retrieval forwards. Runs alternate capfilt / transformers; the best of
the rounds is kept and images/s and the ratio are printed. `bootstrap` combines nucleus
captioning + ITM per image, the CapFilt work. On the CPU each capfilt row also gets its achieved
FLOP/s as a fraction of the matmul peak (`mfu`): the FLOPs of one call of exactly the timed
capfilt work (same batch, same seeded decoding, so the same tokens) are counted with torch's
`FlopCounterMode` (matrix products, attention and convolutions; element-wise work is not
counted), divided by the best time, and set against the best fp32 1024x1024 `torch.mm` FLOP/s at
the same thread count (`benchmarks/train_step.py`'s `matmul_peak`), measured before and after
the runs in the same process. The last line is one JSON object.
Usage: `python benchmarks/caption.py [--quick] [--device cpu|cuda] [--presets tiny base]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.blip import BlipCaptioner, BlipFilter
from models.config import resolve_config
from models.convert import hf_to_capfilt
from models.convert_config import capfilt_config_to_hf
from models.generation import GenerationConfig, generate

MAX_NEW, MIN_NEW = 20, 5
PEAK = 8.0  # logit scale of the random captioner: a small nucleus, like a trained model's


def preset_config(name: str, quick: bool):
    """(label, capfilt config): `base` runs at 4+4 layers and 224 px in quick mode (labelled)."""
    if name == "tiny":
        return "tiny", resolve_config("tiny")
    if quick:
        return "base-d4-224px", resolve_config("base", {"vision.depth": 4, "text.num_layers": 4,
                                                        "vision.image_size": 224})
    return "base-384px", resolve_config("base", {"vision.image_size": 384})


def build_pair(config, seed: int):
    """transformers captioner + retrieval models with random weights, and their capfilt twins."""
    import transformers

    models = {}
    for arch, cls in (("BlipForConditionalGeneration", BlipCaptioner), ("BlipForImageTextRetrieval", BlipFilter)):
        torch.manual_seed(seed)
        hf = getattr(transformers, arch)(capfilt_config_to_hf(config, arch))
        with torch.no_grad():  # HF initialises the ViT near zero; give every weight some spread
            for name, p in hf.named_parameters():
                if "norm" not in name.lower():
                    p.normal_(0, 0.05)
            if arch == "BlipForConditionalGeneration":  # confident next-token distributions, as a
                hf.text_decoder.cls.predictions.transform.LayerNorm.weight.mul_(PEAK)  # trained captioner's
        ours = cls(config)
        ours.load_state_dict(hf_to_capfilt(hf.state_dict(), ours.state_dict()).state)
        models[arch] = (hf.eval(), ours.eval())
    return models


def best_time(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of `fn` as torch's FlopCounterMode counts them (matmul-like ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _matmul_peak(threads: int) -> float:
    """`benchmarks/train_step.py`'s matmul peak (loaded by path: run as a script, `benchmarks` is
    not an importable package)."""
    spec = importlib.util.spec_from_file_location("train_step_bench", Path(__file__).with_name("train_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.matmul_peak(threads)


def alternate(ours: Callable[[], object], theirs: Callable[[], object], rounds: int,
              device: torch.device) -> tuple[float, float]:
    """Best seconds of each side over `rounds` alternating runs (after one warm-up each)."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(best_time(ours, device))
        t_theirs.append(best_time(theirs, device))
    return min(t_ours), min(t_theirs)


def caption_fns(hf, ours, config, pixels, decoding: str):
    t = config.text
    b = pixels.shape[0]
    prompt = torch.full((b, 1), t.bos_token_id, dtype=torch.long, device=pixels.device)
    hf_prompt = torch.tensor([[t.bos_token_id, t.sep_token_id]] * b, device=pixels.device)
    if decoding == "beam":
        cfg = GenerationConfig(decoding="beam", num_beams=3, max_new_tokens=MAX_NEW, min_new_tokens=MIN_NEW,
                               eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id)
        hf_kwargs = dict(num_beams=3, do_sample=False)
    else:
        cfg = GenerationConfig(decoding="nucleus", top_p=0.9, repetition_penalty=1.1, max_new_tokens=MAX_NEW,
                               min_new_tokens=MIN_NEW, eos_token_id=t.sep_token_id, pad_token_id=t.pad_token_id)
        hf_kwargs = dict(do_sample=True, top_p=0.9, top_k=0, repetition_penalty=1.1, num_beams=1)

    def run_ours():
        with torch.inference_mode():
            return generate(ours.text_decoder, prompt, ours.encode_image(pixels), cfg,
                            generator=torch.Generator().manual_seed(0))

    def run_hf():
        with torch.inference_mode():
            return hf.generate(pixel_values=pixels, input_ids=hf_prompt.clone(), max_new_tokens=MAX_NEW,
                               min_new_tokens=MIN_NEW, **hf_kwargs)

    return run_ours, run_hf


def itm_fns(hf, ours, config, pixels):
    b, dev = pixels.shape[0], pixels.device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 2000, (2, b, 20), generator=g).to(dev) % config.text.vocab_size
    ids[:, :, 0] = config.text.enc_token_id
    ids[:, :, -1] = config.text.sep_token_id
    rows = torch.arange(b, device=dev).repeat_interleave(2)
    flat = ids.transpose(0, 1).reshape(2 * b, 20)  # image-major: text 0, text 1 of image 0, ...

    def run_ours():
        with torch.inference_mode():
            return ours.itm_scores(ours.encode_image(pixels), flat, torch.ones_like(flat), rows)

    def run_hf():
        with torch.inference_mode():
            return [hf(input_ids=ids[k], pixel_values=pixels).itm_score.softmax(-1)[:, 1] for k in range(2)]

    return run_ours, run_hf


def bench_preset(name: str, quick: bool, device: torch.device, batches: list[int], rounds: int) -> dict:
    label, config = preset_config(name, quick)
    models = build_pair(config, seed=0)
    hf_cap, our_cap = (m.to(device) for m in models["BlipForConditionalGeneration"])
    hf_itm, our_itm = (m.to(device) for m in models["BlipForImageTextRetrieval"])
    size = config.vision.image_size
    result: dict = {}
    for b in batches:
        pixels = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b)).to(device)
        row = {}
        for task in ("nucleus", "beam", "itm"):
            fns = itm_fns(hf_itm, our_itm, config, pixels) if task == "itm" else \
                caption_fns(hf_cap, our_cap, config, pixels, task)
            t_ours, t_hf = alternate(*fns, rounds=rounds, device=device)
            flops = count_flops(fns[0])  # the same seeded call as timed: the same tokens
            row[task] = {"capfilt_img_s": b / t_ours, "hf_img_s": b / t_hf, "ratio": t_hf / t_ours,
                         "capfilt_flops": flops, "capfilt_s": t_ours}
            print(f"{label:>14} batch {b:>2} {task:>7}: capfilt {b / t_ours:8.2f} img/s  "
                  f"transformers {b / t_hf:8.2f} img/s  ratio {t_hf / t_ours:5.2f}x  "
                  f"capfilt {flops / t_ours / 1e9:7.2f} GFLOP/s", flush=True)
        t_ours = row["nucleus"]["capfilt_s"] + row["itm"]["capfilt_s"]
        t_hf = b / row["nucleus"]["hf_img_s"] + b / row["itm"]["hf_img_s"]
        row["bootstrap"] = {"capfilt_img_s": b / t_ours, "hf_img_s": b / t_hf, "ratio": t_hf / t_ours,
                            "capfilt_flops": row["nucleus"]["capfilt_flops"] + row["itm"]["capfilt_flops"],
                            "capfilt_s": t_ours}
        print(f"{label:>14} batch {b:>2} bootstrap (nucleus + ITM): ratio {t_hf / t_ours:5.2f}x", flush=True)
        result[f"batch{b}"] = row
    return {"label": label, "results": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute on 2 CPU cores")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--batches", nargs="+", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    threads = torch.get_num_threads()
    on_cpu = device.type == "cpu"
    peak = _matmul_peak(threads) if on_cpu else float("nan")
    summary = {"device": str(device), "threads": threads, "quick": args.quick,
               "max_new_tokens": MAX_NEW, "min_new_tokens": MIN_NEW, "ratios": {}}
    results = {}
    for name in args.presets:
        batches = args.batches or ([1, 8, 32] if name == "tiny" or not args.quick else [1, 8])
        out = bench_preset(name, args.quick, device, batches, rounds)
        results[out["label"]] = out["results"]
        summary["ratios"][out["label"]] = {
            batch: {task: round(v["ratio"], 2) for task, v in row.items()} for batch, row in out["results"].items()}
    if on_cpu:  # a busy machine can depress one peak reading: keep the better of two
        peak = max(peak, _matmul_peak(threads))
        summary["matmul_peak_gflops"] = round(peak / 1e9, 2)
        summary["mfu"] = {label: {batch: {task: round(v["capfilt_flops"] / v["capfilt_s"] / peak, 4)
                                          for task, v in row.items()} for batch, row in rows.items()}
                          for label, rows in results.items()}
        print(f"matmul peak {peak / 1e9:.2f} GFLOP/s ({threads} threads); capfilt's fraction of it (mfu) "
              "is in the JSON line", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
