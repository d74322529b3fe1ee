"""A two-stage DVC pipeline small enough for seconds-long flow tests.

`count` reads the corpus under `data/` (pinned by `data.dvc`) and writes a result, a metrics file
and a loss curve; `report` turns the result into an HTML page and a PNG. The params file is a valid
capfilt params file (its `synth.seed` is the stages' parameter), so the flow loads it as usual.
"""

from __future__ import annotations

from pathlib import Path

COUNT = '''
import json, pathlib, yaml
seed = yaml.safe_load(open("params.yaml"))["synth"]["seed"]
text = pathlib.Path("data/corpus.txt").read_text()
out = pathlib.Path("outputs/count"); out.mkdir(parents=True, exist_ok=True)
(out / "result.txt").write_text(f"{len(text.split())} words, seed {seed}\\n")
(out / "metrics.json").write_text(json.dumps({"words": len(text.split()), "kept_fraction": 0.5,
                                               "nested": {"seed": seed, "flag": True}}))
(out / "loss.csv").write_text("step,loss,loss_lm,lr\\n1,2.0,1.5,0.001\\n2,1.0,0.75,0.0005\\n")
'''
REPORT = '''
import pathlib
out = pathlib.Path("outputs/report"); out.mkdir(parents=True, exist_ok=True)
words = pathlib.Path("outputs/count/result.txt").read_text()
(out / "report.html").write_text(f"<html><body>{words}</body></html>")
(out / "plot.png").write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + words.encode())
'''
DVC_YAML = '''stages:
  count:
    cmd: python count.py
    deps: [data, count.py]
    params: [synth.seed]
    outs: [outputs/count/result.txt]
    metrics:
      - outputs/count/metrics.json: {cache: false}
    plots:
      - outputs/count/loss.csv: {cache: false, x: step, y: loss}
  report:
    cmd: python report.py
    deps: [outputs/count/result.txt, report.py]
    outs: [outputs/report]
'''
PARAMS = "synth:  # the stages' parameter\n  seed: 0\npipeline:\n  retries: 0\n  retry_delay_seconds: 0\n"


def write_tiny(root: Path, corpus: str = "one two three\n") -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "corpus.txt").write_text(corpus)
    (root / "count.py").write_text(COUNT)
    (root / "report.py").write_text(REPORT)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text(PARAMS)
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n")
