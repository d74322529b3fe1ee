"""The evaluate stage's human-facing outputs: CSVs for DVC plots, matplotlib PNGs, report.html.

`plots/rounds.csv` (+ `rounds.png`) holds the headline metrics of both rounds; `plots/itm_hist.csv`
(+ `itm_hist.png`) the histogram of web-text ITM scores for clean and noisy texts (when the web
ground truth is known). `report.html` is one self-contained page: inline CSS, every image a
base64 PNG, no script or external resource. It shows the headline table, on the embedded corpus
the per-attribute table (with how objects were misplaced), the filter's quality,
both plots, and a grid of web images with their web text (struck through when the filter removed
it), their synthetic caption(s), scores and, when known, the noise kind. Rounds 3.. (the rounds
stage) become extra columns and bars; the CapFilt ablation, when run, a table and the same two
panels as the rounds' plot (scores; changes against no CapFilt); the training draws, when run, a
table of the mean gain over draws and a panel per metric of each draw's gain.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from components import atomic
from components.shards import ShardReader
from components.synth_score import ATTRIBUTES, PLACEMENT_KEYS

HEADLINE = ("attribute_accuracy", "strict_accuracy", "cider", "bleu4", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
# the attribute accuracies, how objects were misplaced and (where the human captions miss some
# shape-colour pairs) the pairs named right: the report's second table, on the embedded corpus only
ATTRIBUTE_ROWS = (*(f"{a}_accuracy" for a in ATTRIBUTES), *PLACEMENT_KEYS.values(), "known_pair_accuracy",
                  "novel_pair_accuracy")
BINS = 20
SCORE_LABELS = {"itm": "ITM p(match)", "itm_itc": "ITM log-odds + ITC logit"}  # by bootstrap.signal

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
.plots img{max-width:48%;margin-right:1%}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}.card img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:auto}
.removed{text-decoration:line-through;color:#a33}.kept{color:#262}.kind{font-size:11px;color:#666;text-transform:uppercase}
.pos{color:#262}.neg{color:#a33}"""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


INTERVAL_COLUMNS = ("gain_low", "gain_high", "p_round2_higher")


def rounds_table(metrics: dict[str, Any], keys: tuple[str, ...] = HEADLINE) -> pd.DataFrame:
    """metric, round1, round2 (round3, ... from the rounds stage), gain for the `keys` metrics
    present; with the gain's interval (gain_low, gain_high, p_round2_higher) when evaluate made one."""
    extra = metrics.get("rounds", {})
    intervals = metrics.get("gain_interval", {}).get("metrics")
    rows = []
    for k in keys:
        if metrics["round1"].get(k) is None or metrics["round2"].get(k) is None:
            continue
        row = [k, metrics["round1"][k], metrics["round2"][k], *(m.get(k) for m in extra.values()), metrics["gain"][k]]
        if intervals is not None:
            iv = intervals.get(k, {})
            row += [iv.get("low"), iv.get("high"), iv.get("above_zero")]
        rows.append(row)
    columns = ["metric", "round1", "round2", *extra, "gain", *(INTERVAL_COLUMNS if intervals is not None else ())]
    return pd.DataFrame(rows, columns=columns)


ABLATION_LABELS = {"none": "no CapFilt (round 1)", "captioner": "captioner only", "filter": "filter only",
                   "both": "captioner + filter (round 2)"}


def ablation_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per ablation variant: pre-training pairs by source, then the headline metrics present."""
    runs = metrics["ablation"]
    keys = [k for k in HEADLINE if all(m.get(k) is not None for m in runs.values())]
    rows = [(ABLATION_LABELS.get(name, name), *(m.get("pairs", {}).get(s) for s in ("human", "web", "synthetic")),
             *(m[k] for k in keys)) for name, m in runs.items()]
    return pd.DataFrame(rows, columns=["variant", "human", "web", "synthetic", *keys])


def itm_histogram(web: pd.DataFrame, column: str = "itm_score", probability: bool = True) -> pd.DataFrame:
    """Counts of web-text filter scores per bin, clean (`correct`) vs noisy; bins over [0, 1]
    for a probability, else over the scores' range."""
    values = web[column].to_numpy(dtype=float)
    lo, hi = (0.0, 1.0) if probability or not len(values) else (float(values.min()), float(values.max()))
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
    clean = (web["noise"] == "correct").to_numpy()
    table = pd.DataFrame({"bin": np.round((edges[:-1] + edges[1:]) / 2, 3)})
    table["clean"] = np.histogram(values[clean], edges)[0]
    table["noisy"] = np.histogram(values[~clean], edges)[0]
    return table


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plot_rounds(table: pd.DataFrame) -> bytes:
    """Each round's scores and every later round's change against round 1 (`plot_changes`), with
    round 2's interval over resampled test images as whiskers when the table has one."""
    rounds = [c for c in table.columns if c.startswith("round")]
    labels = {"round1": "round 1 (noisy web)", "round2": "round 2 (bootstrapped)"}
    names = [labels.get(r, f"round {r[5:]}") for r in rounds]
    return plot_changes(table, rounds, names, "round 1", interval_of="round2")


def plot_changes(table: pd.DataFrame, columns: list[str], names: list[str], reference: str,
                 interval_of: str | None = None) -> bytes:
    """Two panels for one row per metric and one column per series (`columns`, shown as `names`;
    the first is the reference): every series' scores (metrics on a 0-1 scale; those that are not,
    CIDEr, in the title), and every other series' change against the first per metric, labelled -
    the differences are a few hundredths, invisible on bars of height ~0.9. `interval_of` names
    the series whose change the table's `gain_low` / `gain_high` bound (drawn as whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_interval = interval_of is not None and "gain_low" in table.columns
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = table[columns].to_numpy(dtype=float)
    unit = table[(np.isnan(values) | (np.abs(values) <= 1.0)).all(axis=1)]
    wide = table[~table.index.isin(unit.index)]
    tall = 4 + 0.8 * max(0, len(columns) - 3)  # room for each change's label
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, tall), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(unit))
    width = 0.8 / max(1, len(columns))
    for i, (c, name) in enumerate(zip(columns, names, strict=True)):
        left.bar(x + (i - (len(columns) - 1) / 2) * width, unit[c], width, label=name, color=colours[i % len(colours)])
    left.set_xticks(x, unit["metric"].tolist(), rotation=30, ha="right")
    left.set_ylim(0, 1.05)
    extra = "; ".join(f"{m}: " + " → ".join(f"{v:.3f}" for v in row) for m, row in
                      zip(wide["metric"], wide[columns].to_numpy(), strict=True))
    left.set_title("test set" + (f" ({extra})" if extra else ""), fontsize=10)
    base, later = columns[0], columns[1:]
    y = np.arange(len(table))
    height = 0.8 / max(1, len(later))
    for i, c in enumerate(later):
        delta = (table[c] - table[base]).to_numpy(dtype=float)
        pos = y + (i - (len(later) - 1) / 2) * height
        err = None
        if has_interval and c == interval_of:
            low, high = (table[k].to_numpy(dtype=float) for k in ("gain_low", "gain_high"))
            err = np.nan_to_num(np.vstack([delta - low, high - delta]))  # (2, M) below / above the bar's end
        right.barh(pos, delta, height, xerr=err, capsize=3, color=colours[(i + 1) % len(colours)],
                   label=names[i + 1], error_kw={"elinewidth": 0.8, "ecolor": "#444"})
        for p, d in zip(pos, delta, strict=True):
            right.annotate(f"{d:+.3f}", (d, p), xytext=(3 if d >= 0 else -3, 0 if err is None else -7),
                           textcoords="offset points", ha="left" if d >= 0 else "right", va="center",
                           fontsize=8 if len(later) < 3 else 6)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(y, table["metric"].tolist())
    right.invert_yaxis()
    deltas = np.abs(table[later].to_numpy(dtype=float) - table[[base]].to_numpy(dtype=float))
    if has_interval:
        deltas = np.hstack([deltas, np.abs(table[["gain_low", "gain_high"]].to_numpy(dtype=float))])
    span = float(np.nanmax(deltas)) if np.isfinite(deltas).any() else 0.0
    right.set_xlim(-1.35 * span - 1e-9, 1.35 * span + 1e-9)
    title = f"change against {reference} (right of 0: better)"
    if has_interval:
        title += f"\nwhiskers: {names[columns.index(interval_of)]}'s interval over resampled test images"
    right.set_title(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(columns))]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    data = _png(fig)
    plt.close(fig)
    return data


def ablation_by_metric(table: pd.DataFrame) -> pd.DataFrame:
    """`ablation_table` turned for `plot_changes`: one row per metric, one column per variant (v0,
    v1, ... in the table's order, v0 = no CapFilt)."""
    keys = [c for c in table.columns if c in HEADLINE]
    return pd.DataFrame({"metric": keys, **{f"v{i}": table[keys].iloc[i].to_numpy(dtype=float)
                                            for i in range(len(table))}})


def plot_ablation(table: pd.DataFrame) -> bytes:
    """Each variant's scores, and each one's change against no CapFilt (round 1)."""
    by_metric = ablation_by_metric(table)
    columns = [c for c in by_metric.columns if c != "metric"]
    return plot_changes(by_metric, columns, table["variant"].tolist(), table["variant"].iloc[0])


def draw_keys(draws: dict[str, Any]) -> list[str]:
    """The summarised metrics of `metrics["draws"]`: the headline ones first, then the rest."""
    summary = draws["summary"]
    return [k for k in HEADLINE if k in summary] + [k for k in summary if k not in HEADLINE]


def draws_table(draws: dict[str, Any]) -> pd.DataFrame:
    """One row per metric: the mean gain over training draws, its interval, sd, draws with a gain
    above 0, then each draw's gain (the run's own draw first)."""
    names = list(draws["draws"])
    rows = []
    for k in draw_keys(draws):
        s = draws["summary"][k]
        rows.append([k, s["mean"], s["low"], s["high"], s["sd"], f"{s['up']} of {s['n']}",
                     *(draws["draws"][n]["gain"].get(k) for n in names)])
    labels = [f"{n} (run)" if n == draws["run"] else n for n in names]
    return pd.DataFrame(rows, columns=["metric", "mean gain", "low", "high", "sd", "up", *labels])


def plot_draws(draws: dict[str, Any]) -> bytes:
    """One panel per metric: each training draw's gain (round 2 - round 1) as a dot (green above 0,
    red below, grey at 0), the run's own draw as a diamond, the mean over draws as a line in its shaded interval, and 0 dashed. Each
    panel has its own scale (CIDEr's gains are ten times the accuracies')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, names = draw_keys(draws), list(draws["draws"])
    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 0.35 * len(names) * rows + 1.3 * rows + 0.6),
                             squeeze=False)
    y = np.arange(len(names))
    for i, (ax, k) in enumerate(zip(axes.flat, keys)):
        s = draws["summary"][k]
        gains = np.array([draws["draws"][n]["gain"].get(k, np.nan) for n in names], dtype=float)
        ax.axvspan(s["low"], s["high"], color="tab:blue", alpha=0.15)
        ax.axvline(s["mean"], color="tab:blue", linewidth=1.5)
        ax.axvline(0, color="black", linestyle="--", linewidth=0.8)
        run = np.array([n == draws["run"] for n in names])
        colour = np.where(gains > 0, "tab:green", np.where(gains < 0, "tab:red", "tab:grey"))
        ax.scatter(gains[~run], y[~run], c=colour[~run], s=25, zorder=3)
        ax.scatter(gains[run], y[run], c=colour[run], s=45, marker="D", zorder=3)
        ax.set_yticks(y, names if i % cols == 0 else [""] * len(names), fontsize=8)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{k}\n{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}], up {s['up']}/{s['n']}", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(f"round 2 - round 1 per training draw (diamond: the run's); line and band: mean and its "
                 f"{100 * draws['confidence']:.0f}% t-interval", fontsize=10)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_histogram(hist: pd.DataFrame, threshold: float | None, xlabel: str = SCORE_LABELS["itm"]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = float(hist["bin"].iloc[1] - hist["bin"].iloc[0]) if len(hist) > 1 else 1.0 / BINS
    ax.bar(hist["bin"], hist["clean"], width, alpha=0.6, label="clean web texts")
    ax.bar(hist["bin"], hist["noisy"], width, alpha=0.6, label="noisy web texts")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set_xlabel(xlabel)
    # log counts: most noise piles up near 0 and would hide the few noisy texts that pass the bar
    positive = (hist[["clean", "noisy"]].to_numpy() > 0).any()
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("texts (log scale)" if positive else "texts")
    ax.set_title("filter scores of web texts")
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data


def pick_grid(web: pd.DataFrame, n: int) -> list[str]:
    """Up to n image keys, round-robin over noise kinds (deterministic)."""
    groups = [g["image_key"].drop_duplicates().tolist() for _, g in web.groupby("noise", sort=True)]
    keys: list[str] = []
    for i in range(max((len(g) for g in groups), default=0)):
        keys += [g[i] for g in groups if i < len(g)]
    return keys[:n]


def _thumb(reader: ShardReader, shard: str, member: str) -> str:
    try:
        data = reader.read(shard, member)
        im = Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, KeyError):
        return ""
    buf = io.BytesIO()
    im.resize((128, 128), Image.NEAREST).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _line(row: Any, label: str) -> str:
    cls = "kept" if row.kept else "removed"
    scores = f"{row.itm_score:.2f}"
    confidence = float(getattr(row, "caption_confidence", float("nan")))
    if math.isfinite(confidence):  # scored with bootstrap.synthetic_confidence
        scores += f", confidence {confidence:.2f}"
    return (f'<div><b>{label}</b> <span class="{cls}">{html.escape(str(row.caption))}</span> '
            f"({scores})</div>")


def grid_html(decisions: pd.DataFrame, keys: list[str], root: Path) -> str:
    cards = []
    with ShardReader(root) as reader:
        for key in keys:
            first = decisions[decisions["image_key"] == key].iloc[0]
            thumb = _thumb(reader, first["shard"], first["member"])
            # synthetic captions belong to the stored image, which identical web images share
            same = decisions[(decisions["shard"] == first["shard"]) & (decisions["member"] == first["member"])]
            lines = [_line(r, "web") for r in same[(same["source"] == "web") & (same["image_key"] == key)].itertuples()]
            lines += [_line(r, "synthetic") for r in same[same["source"] == "synthetic"].itertuples()]
            kind = html.escape(str(first.get("noise", "")))
            cards.append(f'<div class="card"><img alt="{html.escape(key)}" src="data:image/png;base64,{thumb}">'
                         f'<div class="kind">{kind}</div>{"".join(lines)}</div>')
    return '<div class="grid">' + "".join(cards) + "</div>"


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def decoding_table(decoding: dict[str, Any]) -> pd.DataFrame:
    """One row per bootstrap run: decoding, captions, noise ratio, wrong fractions (when scored)."""
    cols = ["synthetic", "noise_ratio", "wrong_fraction", "kept_wrong_fraction"]
    return pd.DataFrame([(label, *(row.get(c) for c in cols)) for label, row in decoding.items()],
                        columns=["decoding", *cols])


def phrase_table(unseen: dict[str, Any]) -> pd.DataFrame:
    """metrics["unseen_phrases"]["top"] as report rows."""
    return pd.DataFrame([{"phrase": r["phrase"], "web texts": r["texts"], "kept": r["kept"],
                          "kept %": f"{100 * r['kept_fraction']:.1f}", "lost": f"{r['lost']:.1f}"}
                         for r in unseen["top"]])


def _filter_table(f: dict[str, Any]) -> pd.DataFrame:
    rows = [(k, f[k]) for k in ("signal", "prior_images", "auroc", "auroc_itm", "auroc_itc", "auroc_itm_itc",
                                "score_threshold",
                                "precision", "recall", "kept_fraction", "synthetic_kept_wrong_fraction",
                                "synthetic_kept")
            if f.get(k) is not None]
    rows += [(f"auroc: correct vs {k}", v) for k, v in f.get("auroc_by_kind", {}).items() if v is not None]
    rows += [(f"auroc: correct vs wrong {a}", v) for a, v in f.get("auroc_by_attribute", {}).items()
             if v is not None]
    where = {"absent": "not in the image", "elsewhere": "on another object"}
    rows += [(f"auroc: correct vs wrong {a}, {where.get(p, p)}", v)
             for a, split in f.get("auroc_by_presence", {}).items() for p, v in split.items() if v is not None]
    rows += [(f"kept fraction: {k}", v) for k, v in f.get("kept_fraction_by_kind", {}).items()]
    rows += [(f"synthetic captions exactly right, auroc of the {k}", v)
             for k, v in f.get("synthetic_auroc_exact", {}).items() if v is not None]
    rows += [(f"synthetic captions {k}: objects in another object's cell", v)
             for k, v in f.get("synthetic_other_object", {}).items() if v is not None]
    return pd.DataFrame(rows, columns=["filter", "value"])


def _test_set_line(ts: dict[str, Any]) -> str:
    """One sentence on the test set: its size and whether any of its images was seen in training."""
    size = f"Test set: {ts['images']} images"
    if not ts["by_manifest"]:
        return f"<p>{size}; not checked against the training images (evaluate.train_manifests is empty).</p>"
    where = ", ".join(f"{html.escape(str(k))}: {v}" for k, v in ts["by_manifest"].items())
    if ts["seen_in_training"]:
        return (f"<p><b>{size}, {ts['seen_in_training']} of them byte-identical to training images "
                f"({where}): their scores flatter both rounds.</b></p>")
    return f"<p>{size}, none byte-identical to an image of the training manifests ({where}).</p>"


def render_html(metrics: dict[str, Any], pngs: dict[str, bytes], grid: str) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>capfilt evaluation</title>",
             f"<style>{_CSS}</style></head><body><h1>capfilt: round 1 vs round 2</h1>",
             _table(rounds_table(metrics))]
    if "gain_interval" in metrics:
        gi = metrics["gain_interval"]
        parts += [f"<p>gain_low, gain_high: the {100 * gi['confidence']:.0f}% interval of round 2 − round 1 "
                  f"over {gi['resamples']} resamples of the test images (the same draws for both rounds); "
                  "p_round2_higher: the share of resamples in which round 2 scores higher. It covers the "
                  "choice of test images, not re-training (a second training run moves the scores too); "
                  "BLEU-4, a corpus statistic, has none.</p>"]
    if "test_set" in metrics:
        parts += [_test_set_line(metrics["test_set"])]
    attributes = rounds_table(metrics, ATTRIBUTE_ROWS)
    if len(attributes):
        parts += ["<h2>Captions by attribute (fractions of the test images' objects)</h2>",
                  "<p>Each caption's objects aligned with the true ones; a misplaced object is put in "
                  "another object's cell (position_other_object: the right cells, bound to the wrong "
                  "objects), in an empty cell, or not placed (no position said, or the object left "
                  "out). Position accuracy and the three ways of missing it sum to 1.</p>", _table(attributes)]
    if "ablation" in metrics:
        parts += ["<h2>CapFilt ablation (pre-training pairs by source; test metrics)</h2>",
                  _table(ablation_table(metrics))]
    if "draws" in metrics:
        d = metrics["draws"]
        parts += [f"<h2>Gain over {len(d['draws'])} training draws (round 2 − round 1 at each seed)</h2>",
                  f"<p>Both rounds re-trained at each seed on the run's corpora (the draws stage); low, high: "
                  f"the {100 * d['confidence']:.0f}% Student-t interval of the mean gain, each seed's pair "
                  "taken as an independent draw; up: draws in which round 2 scored higher.</p>",
                  _table(draws_table(d))]
    if "filter" in metrics:
        parts += ["<h2>Filter vs web ground truth</h2>", _table(_filter_table(metrics["filter"]))]
    if metrics.get("unseen_phrases", {}).get("top"):
        u = metrics["unseen_phrases"]
        parts += ["<h2>Phrases no human caption uses, by how many more of their web texts the filter removed</h2>",
                  f"<p>The filter kept {100 * u['kept_fraction']:.1f}% of the {u['texts']} web texts. Each row: a "
                  f"phrase of up to {u['max_words']} words in at least {u['min_texts']} web texts and in no human "
                  "caption; lost: how many more of its texts were removed than that average rate would remove. "
                  "Boilerplate belongs here; a concept here is one the captioner and filter never saw named, "
                  "and the cleaned corpus loses it.</p>", _table(phrase_table(u))]
    if "decoding" in metrics:
        parts += ["<h2>Synthetic captions by decoding (noise ratio: the fraction the filter removed)</h2>",
                  _table(decoding_table(metrics["decoding"]))]
    imgs = "".join(f'<img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
                   for n, b in pngs.items())
    parts += [f'<div class="plots">{imgs}</div>']
    if grid:
        parts += ["<h2>Web images: web text (struck through when removed), synthetic caption, "
                  "ITM score (and the captioner's confidence, when scored)</h2>", grid]
    return "".join(parts) + "</body></html>\n"


def write_outputs(out: Path, metrics: dict[str, Any], decisions: pd.DataFrame | None, truth: pd.DataFrame | None,
                  bootstrap_root: Path, grid_images: int, captions: dict[str, dict[str, str]]) -> None:
    """plots/*.csv, plots/*.png and report.html under `out`."""
    table = rounds_table(metrics)
    atomic.write_bytes(out / "plots" / "rounds.csv", table.to_csv(index=False).encode())
    pngs = {"rounds": plot_rounds(table)}
    grid = ""
    if decisions is not None:
        noise = truth["noise"] if truth is not None else pd.Series(dtype=str)
        decisions = decisions.assign(noise=[noise.get(Path(k).stem, "unknown") for k in decisions["image_key"]])
        web = decisions[decisions["source"] == "web"]
        if truth is not None:
            filt = metrics.get("filter", {})
            signal = filt.get("signal") or "itm"
            hist = itm_histogram(web, "score", probability=signal == "itm")
            atomic.write_bytes(out / "plots" / "itm_hist.csv", hist.to_csv(index=False).encode())
            label = SCORE_LABELS.get(signal, signal) + (", text-prior corrected" if filt.get("prior_images") else "")
            pngs["itm_hist"] = plot_histogram(hist, filt.get("score_threshold"), label)
        grid = grid_html(decisions, pick_grid(web, grid_images), bootstrap_root)
    for name, data in pngs.items():
        atomic.write_bytes(out / "plots" / f"{name}.png", data)
    if "ablation" in metrics:  # only in the page: the plots/ files are the stage's declared outputs
        pngs["ablation"] = plot_ablation(ablation_table(metrics))
    if "draws" in metrics:
        pngs["draws"] = plot_draws(metrics["draws"])
    atomic.write_bytes(out / "report.html", render_html(metrics, pngs, grid).encode())
