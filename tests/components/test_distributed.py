"""Gathers across ranks (two real gloo processes) and a 2-rank run through the deepspeed launcher."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components import distributed as D

HERE = Path(__file__).parent


def test_one_rank_gathers_are_identities():
    g = D.make_gathers(1)
    x = torch.randn(3, 2, requires_grad=True)
    assert g.no_grad(x) is x and g.with_grad(x) is x


def test_launch_command_reinvokes_the_cli_on_every_rank():
    cmd = D.launch_command(2, ["stage", "pretrain", "--params", "p.yaml"], port=29999)
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[4:] == ["--num_gpus", "2", "--master_port", "29999", "--no_local_rank", "--module",
                       "components.cli", "stage", "pretrain", "--params", "p.yaml"]


def _gather_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = D.make_gathers(2)
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)  # rank 0: ones, rank 1: twos
    everyone = g.with_grad(x)  # (4, 3)
    weights = torch.arange(4.0).unsqueeze(1)  # row i weighted by i on both ranks
    (everyone * weights).sum().backward()
    torch.save({"gathered": everyone.detach(), "no_grad": g.no_grad(x), "grad": x.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gathers_concatenate_ranks_and_route_gradients(tmp_path):
    mp.spawn(_gather_worker, args=(D.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    want = torch.cat([torch.ones(2, 3), 2 * torch.ones(2, 3)])
    for r in (r0, r1):
        assert torch.equal(r["gathered"], want) and torch.equal(r["no_grad"], want)
    # Both ranks' losses use every row: d/dx_rank = sum over ranks of the row weights = 2·i.
    assert torch.equal(r0["grad"], torch.tensor([[0.0], [2.0]]).expand(2, 3))
    assert torch.equal(r1["grad"], torch.tensor([[4.0], [6.0]]).expand(2, 3))


def _curve(path: Path) -> list[float]:
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


@pytest.mark.slow
def test_two_ranks_match_one_rank_at_the_same_global_batch(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *sys.path]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Without dropout the only difference is the order of floating-point sums.
    D.launch_ranks(2, [str(tmp_path / "two"), "15", "0", "8", "0"], module="toy_training")
    D.launch_ranks(1, [str(tmp_path / "one"), "15", "0", "16", "0"], module="toy_training")
    two, one = _curve(tmp_path / "two/loss.csv"), _curve(tmp_path / "one/loss.csv")
    assert len(two) == 15 and two == pytest.approx(one, rel=1e-4)
    w2, w1 = torch.load(tmp_path / "two/final.pt"), torch.load(tmp_path / "one/final.pt")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


def test_single_process_takes_a_fresh_port_even_when_one_is_inherited(monkeypatch):
    import socket

    from components import distributed

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(taken))
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
        distributed.init_single_process()
        assert int(distributed.os.environ["MASTER_PORT"]) != taken
        assert distributed.os.environ["WORLD_SIZE"] == "1"


def test_extensions_use_the_interpreters_own_ninja(tmp_path, monkeypatch):
    """Another ninja version would discard the pre-built op's build log and compile it again."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ninja").write_text("#!/bin/sh\n")
    (bin_dir / "ninja").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python3"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert D.use_extensions_dir() == tmp_path / "ext"
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    D.use_extensions_dir()  # idempotent
    assert os.environ["PATH"] == f"{bin_dir}:/usr/bin:/bin"
    (bin_dir / "ninja").unlink()
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    D.use_extensions_dir()  # no ninja of its own: PATH untouched
    assert os.environ["PATH"] == "/usr/bin:/bin"
