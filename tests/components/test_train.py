"""The one training loop on a toy model: DeepSpeed wiring, determinism, resume, guards, outputs."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from components.errors import CapfiltError
from components.train import fingerprint_of, run_training

sys.path.insert(0, str(Path(__file__).parent))
from toy_training import Toy, ToyData, toy_configs, toy_objective  # noqa: E402

TOY_SCRIPT = Path(__file__).parent / "toy_training.py"


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _curve(path: Path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_loss_falls_and_outputs_are_written(tmp_path):
    cfg, schedule = toy_configs(steps=30)
    logged = []
    result = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path,
                          log_metrics=lambda m, s: logged.append((s, dict(m))))
    curve = _curve(tmp_path / "loss.csv")
    assert len(curve) == 30 and curve[-1] < 0.5 * curve[0]
    with open(tmp_path / "loss.csv") as f:
        assert next(csv.reader(f)) == ["step", "loss", "mse", "lr"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["samples_per_s"] > 0 and metrics["peak_rss_mb"] > 0
    assert metrics["final_loss"] == pytest.approx(result.final_loss, rel=1e-5)
    assert [s for s, _ in logged[:3]] == [1, 2, 3] and "lr" in logged[0][1]
    assert logged[-1][1]["steps"] == 30  # the summary goes through the same callable
    assert set(result.state_dict) == set(Toy().state_dict())


def test_same_seed_same_curve_and_seed_matters(tmp_path):
    cfg, schedule = toy_configs(steps=12)
    for name in ("a", "b"):
        run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path / name)
    assert _curve(tmp_path / "a/loss.csv") == _curve(tmp_path / "b/loss.csv")
    other, _ = toy_configs(steps=12, seed=7)
    run_training(other, schedule, Toy, toy_objective, ToyData(), tmp_path / "c")
    assert _curve(tmp_path / "c/loss.csv") != _curve(tmp_path / "a/loss.csv")


def test_grad_accumulation_counts_micro_batches(tmp_path):
    cfg, schedule = toy_configs(steps=4, grad_accum=3, checkpoint_every=100)
    result = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path)
    state = torch.load(tmp_path / "resume/step00000004/rank000_state.pt", weights_only=True)
    assert state["consumed"] == 12 and state["epoch"] == 0  # 4 steps × 3 micro-batches
    assert result.metrics["samples_per_s"] > 0


def test_non_finite_loss_names_the_step_and_saves_nothing(tmp_path):
    cfg, schedule = toy_configs(steps=10, checkpoint_every=100)
    with pytest.raises(CapfiltError, match=r"non-finite loss at step 4: loss=nan \(mse=nan\)"):
        run_training(cfg, schedule, Toy, toy_objective, ToyData(poison_at=4), tmp_path)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "loss.csv").exists()
    assert not list((tmp_path / "resume").glob("step*"))


def test_a_changed_run_does_not_resume_stale_checkpoints(tmp_path):
    cfg, schedule = toy_configs(steps=6)
    run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path)
    again = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path)
    assert again.resumed_from == 6  # same run: picks up the final checkpoint, trains nothing
    changed = schedule.model_copy(update={"lr": 0.02})
    fresh = run_training(cfg, changed, Toy, toy_objective, ToyData(), tmp_path)
    assert fresh.resumed_from == 0
    assert fingerprint_of(cfg, schedule) != fingerprint_of(cfg, changed)
    assert fingerprint_of(cfg, schedule, "data-a") != fingerprint_of(cfg, schedule, "data-b")


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    cfg, schedule = toy_configs(steps=10, checkpoint_every=4, keep_checkpoints=3)
    full = run_training(cfg, schedule, Toy, toy_objective, ToyData(n=64), tmp_path / "full")
    # Roll the second run back to its step-4 checkpoint, as if it had died after saving it.
    part = tmp_path / "part"
    run_training(cfg, schedule, Toy, toy_objective, ToyData(n=64), part)
    (part / "resume/latest").write_text("step00000004")
    resumed = run_training(cfg, schedule, Toy, toy_objective, ToyData(n=64), part)
    assert resumed.resumed_from == 4  # and the data crossed an epoch boundary (8 batches/epoch)
    for key, value in full.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=0, atol=0)
    assert _curve(part / "loss.csv") == _curve(tmp_path / "full/loss.csv")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_weights(tmp_path):
    # Not this process's rendezvous (earlier in-process runs set it): each run finds its own port.
    rendezvous = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(TOY_SCRIPT), str(ref), "40"], check=True, env=env,
                   capture_output=True)
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(TOY_SCRIPT), str(run), "40", "0.05"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(run / "resume/step00000010", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final.pt").exists()
    subprocess.run([sys.executable, str(TOY_SCRIPT), str(run), "40"], check=True, env=env,
                   capture_output=True)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 10
    want, got = torch.load(ref / "final.pt"), torch.load(run / "final.pt")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)
    assert _curve(run / "loss.csv") == pytest.approx(_curve(ref / "loss.csv"), rel=1e-5)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_train_like_plain_data_parallel(tmp_path, stage):
    cfg, schedule = toy_configs(steps=6, checkpoint_every=3)
    plain = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path / "plain")
    zero_cfg, _ = toy_configs(steps=6, checkpoint_every=3, zero_stage=stage)
    zero = run_training(zero_cfg, schedule, Toy, toy_objective, ToyData(), tmp_path / "zero")
    assert _curve(tmp_path / "zero/loss.csv") == pytest.approx(_curve(tmp_path / "plain/loss.csv"), rel=1e-5)
    for key, value in plain.state_dict.items():
        torch.testing.assert_close(zero.state_dict[key], value, rtol=1e-5, atol=1e-6)


def test_bf16_trains(tmp_path, cpu_bf16_units, caplog):
    cpu_bf16_units(False, False)  # a CPU without bf16 units
    cfg, schedule = toy_configs(steps=4, precision="bf16")
    with caplog.at_level(logging.WARNING, logger="components.hardware"):
        result = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path / "bf16")
    assert result.state_dict["fc1.weight"].dtype == torch.bfloat16 and result.final_loss == result.final_loss
    if not torch.cuda.is_available():  # trained on the CPU: the emulated bf16 is named
        assert any(r.getMessage().startswith("train.precision: bf16") for r in caplog.records)

def test_zero3_checkpoint_loads_back_into_the_same_weights(tmp_path):
    cfg, schedule = toy_configs(steps=6, checkpoint_every=3, zero_stage=3)
    first = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path)
    again = run_training(cfg, schedule, Toy, toy_objective, ToyData(), tmp_path)  # finds step 6 done
    assert first.resumed_from == 0 and again.resumed_from == 6
    assert again.state_dict["temp"].shape == torch.Size([])
    for key, value in first.state_dict.items():
        torch.testing.assert_close(again.state_dict[key], value, rtol=0, atol=0)
