"""Ingest throughput and memory: `capfilt ingest` against a plain single-threaded Pillow loop.

Two synthetic folders are drawn (numpy noise plus filled shapes): small 64×64 PNGs, stored as PNG,
and larger 640×480 JPEGs, stored as JPEG with the longer side bounded to 384. On each, the same
run times `capfilt ingest` (a child process, all cores, then one worker) and a straightforward
loop doing the same work in this process, interleaved, best of 2 (quick) or 3 rounds (open, verify, reopen, EXIF transpose, convert to RGB,
resize, encode, append to a tar). Images/s use the time inside the work (the CLI's own
`summary.json` seconds; interpreter start-up and imports are reported separately as wall time).
Peak memory is the highest sum of RSS over the child's process tree, sampled every 20 ms in
separate runs, at 1× and 10× the small input: streaming ingest should stay flat. The last line printed is one JSON
object with every number. Usage: `python benchmarks/ingest.py [--quick] [--workers N]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw, ImageOps


def draw_corpus(folder: Path, n: int, size: tuple[int, int], fmt: str, seed: int = 0) -> Path:
    """n images with a BLIP-format json next to them; returns the json path."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, ext = [], {"PNG": "png", "JPEG": "jpg"}[fmt]
    w, h = size
    for i in range(n):
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        im = Image.fromarray(noise)
        draw = ImageDraw.Draw(im)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = x0 + int(rng.integers(4, w // 2)), y0 + int(rng.integers(4, h // 2))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        rel = f"images/{i:06d}.{ext}"
        im.save(folder / rel, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        rows.append({"image": rel, "caption": f"picture number {i}"})
    path = folder / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def plain_loop(ann: Path, out: Path, max_side: int, fmt: str) -> float:
    """The straightforward single-threaded baseline; returns seconds."""
    start = time.perf_counter()
    rows = json.loads(ann.read_text())
    with tarfile.open(out, "w") as tar:
        for i, row in enumerate(rows):
            path = ann.parent / row["image"]
            with Image.open(path) as im:
                im.verify()
            im = Image.open(path)
            im = ImageOps.exif_transpose(im).convert("RGB")
            if max(im.size) > max_side:
                s = max_side / max(im.size)
                im = im.resize((round(im.width * s), round(im.height * s)), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
            info = tarfile.TarInfo(f"{i:06d}.{fmt.lower()}")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    return time.perf_counter() - start


def run_capfilt(ann: Path, out: Path, workers: int, fmt: str, max_side: int,
                memory: bool = False) -> dict[str, float]:  # fmt: skip
    """`capfilt ingest` in a child process; seconds (work), wall seconds and, when `memory`,
    the peak RSS of its process tree (sampling costs CPU, so timing runs do not sample)."""
    cmd = [sys.executable, "-m", "components.cli", "ingest", str(ann), "--out", str(out),
           "--workers", str(workers), "--params", str(out.parent / "none.yaml"),
           "--set", f"ingest.image_format={fmt}", "--set", f"ingest.max_side={max_side}"]  # fmt: skip
    (out.parent / "none.yaml").write_text("{}\n")
    start = time.perf_counter()
    log = out.parent / f"{out.name}.log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    parent, peak = psutil.Process(proc.pid), 0
    while memory and proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"capfilt ingest failed: {log.read_text()[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": summary["seconds"], "wall_s": round(wall, 3), "peak_rss_mb": round(peak / 2**20, 1),
            "images": summary["images_stored"]}  # fmt: skip


def compare(name: str, ann: Path, n: int, work: Path, workers: int, fmt: str, max_side: int,
            repeats: int) -> dict:  # fmt: skip
    """Best of `repeats` interleaved rounds of each method (the machine may be shared)."""
    base, pars, ones = [], [], []
    for _ in range(repeats):
        base.append(plain_loop(ann, work / f"{name}_plain.tar", max_side, fmt))
        pars.append(run_capfilt(ann, work / f"{name}_par", workers, fmt.lower(), max_side))
        ones.append(run_capfilt(ann, work / f"{name}_one", 1, fmt.lower(), max_side))
    base_s = min(base)
    par = min(pars, key=lambda r: r["seconds"])
    one = min(ones, key=lambda r: r["seconds"])
    res = {
        "images": n,
        "plain_img_s": round(n / base_s, 1),
        "capfilt_img_s": round(n / par["seconds"], 1),
        "capfilt_1worker_img_s": round(n / one["seconds"], 1),
        "ratio_vs_plain": round(base_s / par["seconds"], 2),
        "ratio_1worker_vs_plain": round(base_s / one["seconds"], 2),
        "capfilt_wall_s": par["wall_s"],
        "plain_s": round(base_s, 3),
    }
    print(f"{name}: plain {res['plain_img_s']} img/s | capfilt ({workers} workers) "
          f"{res['capfilt_img_s']} img/s = {res['ratio_vs_plain']}x | 1 worker "
          f"{res['capfilt_1worker_img_s']} img/s = {res['ratio_1worker_vs_plain']}x "
          f"(CLI wall incl. start-up {par['wall_s']} s)")  # fmt: skip
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs (about a minute)")
    parser.add_argument("--workers", type=int, default=0, help="capfilt workers (0 = all cores)")
    args = parser.parse_args()
    n_small, n_large = (300, 60) if args.quick else (3000, 400)
    workers = args.workers or os.cpu_count() or 1
    result: dict = {"quick": args.quick, "workers": workers, "cpu_count": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as tmp:
        work = Path(tmp)
        small = draw_corpus(work / "small", n_small, (64, 64), "PNG")
        large = draw_corpus(work / "large", n_large, (640, 480), "JPEG", seed=1)
        reps = 2 if args.quick else 3
        result["png_64"] = compare("png_64", small, n_small, work, workers, "PNG", 512, reps)
        result["jpeg_640x480"] = compare("jpeg_640x480", large, n_large, work, workers, "JPEG", 384,
                                         reps)  # fmt: skip
        big = draw_corpus(work / "small10", n_small * 10, (64, 64), "PNG", seed=2)
        rss1 = run_capfilt(small, work / "mem1", workers, "png", 512, memory=True)["peak_rss_mb"]
        rss10 = run_capfilt(big, work / "mem10", workers, "png", 512, memory=True)["peak_rss_mb"]
        result["peak_rss_mb"] = {"1x": rss1, "10x": rss10, "ratio": round(rss10 / rss1, 2)}
        print(f"peak RSS (process tree): {rss1} MB at {n_small} images, {rss10} MB at "
              f"{n_small * 10} images ({result['peak_rss_mb']['ratio']}x)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
