"""The ablation and rounds stages without training: variant manifests from real bootstrap outputs
(tiny random-weight models), the disabled defaults, the `--set` overrides the stage chains pass,
the chain guard, and the ablation table in the report."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from components import ablation, bootstrap, chain, evaluate, report, rounds
from components.config import EvaluateConfig, Params, load_params
from components.distributed import RankInfo
from components.errors import CapfiltError
from components.schemas import read_manifest
from components.shards import ShardReader

sys.path.insert(0, str(Path(__file__).parent))
from capfilt_fixtures import SPLIT, boot_cfg, lenient_validation, make_world  # noqa: E402


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    """Params whose bootstrap section points at a finished bootstrap that kept some of everything."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ablation")
    world = make_world(root, n_web=10, web_shard=3)
    cfg = boot_cfg(world, root / "boot", itm_threshold=SPLIT)
    bootstrap.run(cfg, lenient_validation(), RankInfo(0, 1, 0))
    params = Params(bootstrap=cfg, validation=lenient_validation(),
                    evaluate=EvaluateConfig(ablation_out=str(root / "ablation"), rounds_out=str(root / "rounds")))
    return world, params


def _ids(df: pd.DataFrame, source: str) -> list[str]:
    return sorted(df.loc[df["source"] == source, "sample_id"])


def _no_training(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(chain, "run_stage_process", lambda *a, **k: calls.append(a))
    return calls


def test_captioner_variant_holds_every_text_once_and_every_non_empty_caption(booted, tmp_path):
    world, params = booted
    kept, removed = ablation.read_bootstrap(params)
    path = ablation.build_variant(params, kept, removed, "captioner", tmp_path / "cap")
    got = read_manifest(path, "bootstrapped")
    web = read_manifest(world.web, "ingested")
    human = read_manifest(world.human, "ingested")
    assert _ids(got, "web") == sorted(web["sample_id"])  # kept and removed, each once
    assert _ids(got, "human") == sorted(human["sample_id"])
    all_synthetic = pd.concat([kept, removed])
    assert _ids(got, "synthetic") == _ids(all_synthetic, "synthetic") and len(_ids(got, "synthetic")) == 10
    assert 0 < (removed["source"] == "web").sum() < 10  # SPLIT removed some web texts: they came back
    # removed rows got their image columns and provenance back, equal to the web manifest's
    back = got[got["source"] == "web"].set_index("sample_id").sort_index()
    want = web.set_index("sample_id").sort_index()
    for col in ("image_key", "caption", "split", "width", "height", "sha256", "ref", "member"):
        assert back[col].tolist() == want[col].tolist(), col
    assert set(got.loc[got["source"] != "human", "captioner"]) == set(kept.loc[kept["source"] != "human", "captioner"])
    with ShardReader(path.parent) as reader:  # shard paths resolve next to the variant manifest
        for row in got.itertuples():
            assert reader.read(row.shard, row.member)[:4] == b"\x89PNG"
    assert (path.parent / "expectations" / "expectations.json").is_file()


def test_captioner_variant_drops_empty_captions_only():
    kept = pd.DataFrame({"sample_id": ["h", "w1"], "source": ["human", "web"]})
    removed = pd.DataFrame({"sample_id": ["w2", "s1", "s2", "s3"],
                            "source": ["web", "synthetic", "synthetic", "synthetic"],
                            "reason": ["itm_below_threshold", "duplicate", "empty_caption", "itm_below_threshold"]})
    rows = ablation.variant_rows(kept, removed, "captioner")
    assert rows["sample_id"].tolist() == ["h", "w1", "w2", "s1", "s3"] and "reason" not in rows
    assert ablation.variant_rows(kept, removed, "filter")["sample_id"].tolist() == ["h", "w1"]
    with pytest.raises(CapfiltError, match="variants: captioner, filter"):
        ablation.variant_rows(kept, removed, "both")


def test_filter_variant_holds_the_kept_web_texts_and_no_synthetic(booted, tmp_path):
    world, params = booted
    kept, removed = ablation.read_bootstrap(params)
    got = read_manifest(ablation.build_variant(params, kept, removed, "filter", tmp_path / "filt"), "bootstrapped")
    assert _ids(got, "web") == _ids(kept, "web") and 0 < len(_ids(got, "web")) < 10
    assert _ids(got, "synthetic") == []
    assert _ids(got, "human") == sorted(read_manifest(world.human, "ingested")["sample_id"])
    counts = ablation.corpus_counts(got)
    assert counts == {"human": 12, "web": len(_ids(kept, "web")), "synthetic": 0}


def test_disabled_ablation_writes_its_flag_and_trains_nothing(booted, monkeypatch):
    _, params = booted
    calls = _no_training(monkeypatch)
    metrics = ablation.run(params)
    out = Path(params.evaluate.ablation_out)
    assert metrics == {"enabled": False, "n_variants": 0}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert calls == [] and list((out / "variants").iterdir()) == []


def test_one_round_is_a_no_op(booted, monkeypatch):
    _, params = booted
    calls = _no_training(monkeypatch)
    assert rounds.run(params) == {"rounds": 1}
    out = Path(params.bootstrap.rounds_out)
    assert json.loads((out / "metrics.json").read_text()) == {"rounds": 1}
    assert calls == [] and list((out / "extra").iterdir()) == []


def test_rounds_must_be_at_least_one(tmp_path):
    (tmp_path / "p.yaml").write_text("bootstrap:\n  rounds: 0\n")
    with pytest.raises(CapfiltError, match="bootstrap.rounds"):
        load_params(tmp_path / "p.yaml")


def test_stage_chain_overrides_reach_the_stage_as_typed_values(tmp_path, monkeypatch):
    work = chain.open_chain(Params(), tmp_path / "c", tmp_path / "resume", {"a": 1}, [])
    argv: list[list[str]] = []
    monkeypatch.setattr(chain.children, "run", lambda a: argv.append(a) or type("P", (), {"returncode": 0}))
    odd = tmp_path / "a dir: [x]" / "m.parquet"  # spaces, a colon and brackets survive as one path
    chain.train_chain(work, [odd, tmp_path / "n.parquet"])
    assert [a[4] for a in argv] == ["retrain", "finetune2-captioner", "finetune2-filter"]
    retrain = argv[0]
    assert retrain[5:7] == ["--params", str(work.params_file)]
    p = load_params(work.params_file, retrain[8::2])
    assert p.retrain.manifests == [str(odd), str(tmp_path / "n.parquet")]
    assert (p.retrain.out, p.retrain.resume_dir) == (str(work.retrain), str(work.resume / "retrain"))
    assert p.pretrain == Params().pretrain  # everything else as given
    tune = load_params(work.params_file, argv[1][8::2])
    assert tune.finetune.round2_init == str(work.retrain / "model")
    assert tune.finetune.round2_out == str(work.finetune) and tune.finetune.resume_dir == str(work.resume)


def test_chain_skips_finished_steps_and_starts_afresh_when_inputs_change(tmp_path, monkeypatch):
    calls = _no_training(monkeypatch)
    data = tmp_path / "m.parquet"
    data.write_bytes(b"one")
    work = chain.open_chain(Params(), tmp_path / "c", tmp_path / "r", {"s": 1}, [data])
    (work.retrain / "model").mkdir(parents=True)
    (work.retrain / "model" / "config.json").write_text("{}")
    chain.train_chain(work, [data])
    assert [c[0] for c in calls] == ["finetune2-captioner", "finetune2-filter"]  # retrain was done
    calls.clear()
    chain.open_chain(Params(), tmp_path / "c", tmp_path / "r", {"s": 1}, [data])
    assert (work.retrain / "model").is_dir()  # same inputs: kept
    data.write_bytes(b"two")
    chain.open_chain(Params(), tmp_path / "c", tmp_path / "r", {"s": 1}, [data])
    assert not work.retrain.exists()  # other inputs: the old outputs are gone
    (work.retrain / "model").mkdir(parents=True)
    chain.open_chain(Params(), tmp_path / "c", tmp_path / "r", {"s": 2}, [data])
    assert not work.retrain.exists()  # other settings: likewise
    with pytest.raises(CapfiltError, match="input not found"):
        chain.open_chain(Params(), tmp_path / "c", tmp_path / "r", {}, [tmp_path / "missing"])


def _round(v: float) -> dict[str, float]:
    return {k: v for k in evaluate.HEADLINE}


def test_evaluate_adds_the_ablation_table_and_the_report_shows_it(tmp_path):
    out = tmp_path / "ablation"
    cfg = EvaluateConfig(ablation=True, ablation_out=str(out), rounds_out=str(tmp_path / "rounds"))
    metrics = {"round1": _round(0.1), "round2": _round(0.4), "gain": _round(0.3)}
    with pytest.raises(CapfiltError, match="run the ablation stage"):
        evaluate.ablation_rows(cfg, metrics)
    out.mkdir()
    corpus = {"captioner": {"human": 5, "web": 10, "synthetic": 10}, "filter": {"human": 5, "web": 4, "synthetic": 0}}
    (out / "metrics.json").write_text(json.dumps({"enabled": True, "n_variants": 2, "corpus": corpus,
                                                  "variants": {"captioner": _round(0.2), "filter": _round(0.3)}}))
    rows = evaluate.ablation_rows(cfg, metrics)
    assert list(rows) == ["none", "captioner", "filter", "both"]
    assert rows["none"]["cider"] == 0.1 and rows["both"]["cider"] == 0.4 and rows["filter"]["pairs"]["web"] == 4
    assert evaluate.ablation_rows(cfg.model_copy(update={"ablation": False}), metrics) is None
    metrics["ablation"] = rows
    table = report.ablation_table(metrics)
    assert table["variant"].tolist() == ["no CapFilt (round 1)", "captioner only", "filter only",
                                         "captioner + filter (round 2)"]
    assert table["i2t_r1"].tolist() == [0.1, 0.2, 0.3, 0.4]
    by_metric = report.ablation_by_metric(table)  # what the plot draws: a column per variant, in order
    assert by_metric["metric"].tolist() == [k for k in report.HEADLINE if k in table.columns]
    assert by_metric.set_index("metric").loc["i2t_r1"].tolist() == [0.1, 0.2, 0.3, 0.4]
    png = report.plot_ablation(table)
    assert Image.open(io.BytesIO(png)).size[0] > 1000  # both panels: scores, changes against no CapFilt
    page = report.render_html(metrics, {"ablation": png}, "")
    assert "captioner only" in page and "<h2>CapFilt ablation" in page and page.count("data:image/png") == 1


def test_extra_rounds_become_report_columns(tmp_path):
    cfg = EvaluateConfig(rounds_out=str(tmp_path))
    assert evaluate.extra_rounds(cfg) is None  # the stage did not run
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": 1}))
    assert evaluate.extra_rounds(cfg) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"rounds": 2, "test": {"round3": _round(0.5)}}))
    metrics = {"round1": _round(0.1), "round2": _round(0.4), "gain": _round(0.3), "rounds": evaluate.extra_rounds(cfg)}
    table = report.rounds_table(metrics)
    assert list(table.columns) == ["metric", "round1", "round2", "round3", "gain"]
    assert table["round3"].tolist() == [0.5] * len(evaluate.HEADLINE)
    assert report.plot_rounds(table)[:4] == b"\x89PNG"


def test_rounds_plot_survives_equal_rounds_and_a_metric_above_one():
    import pandas as pd

    table = pd.DataFrame({"metric": ["attribute_accuracy", "cider"], "round1": [0.9, 4.7],
                          "round2": [0.9, 4.7], "gain": [0.0, 0.0]})  # no change: a zero-width axis
    assert report.plot_rounds(table)[:4] == b"\x89PNG"


def test_dvc_yaml_params_and_stage_table_agree():
    import yaml

    from components.stages import RANKED_STAGES, STAGES

    root = Path(__file__).resolve().parents[2]
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    p = load_params(root / "params.yaml")
    dumped = p.model_dump()
    assert p.evaluate.rounds_out == p.bootstrap.rounds_out and not p.evaluate.ablation and p.bootstrap.rounds == 1
    for name, out in (("ablation", p.evaluate.ablation_out), ("rounds", p.bootstrap.rounds_out)):
        stage = dvc[name]
        assert stage["cmd"] == f"capfilt stage {name}" and name in STAGES and name not in RANKED_STAGES
        assert [next(iter(o)) for o in stage["metrics"]] == [f"{out}/metrics.json"]
        outs = [next(iter(o)) for o in stage["outs"]]
        assert outs == [f"{out}/{'variants' if name == 'ablation' else 'extra'}"]
        assert stage["outs"][0][outs[0]]["persist"] is True
        assert f"{out}/metrics.json" in dvc["evaluate"]["deps"] and f"components/{name}.py" in stage["deps"]
        for dotted in stage["params"]:
            node = dumped
            for key in dotted.split("."):
                assert key in node, f"{name}: params {dotted}"
                node = node[key]
