"""Processes and ranks for the training stages: one process, or many through the deepspeed launcher.

A training stage runs in one of two ways. With `train.processes == 1` it runs in the calling
process: `init_single_process` fills in the rendezvous variables that DeepSpeed would otherwise
look for through MPI (a free local port) and starts a one-member process group. With more
processes, the stage re-invokes itself (`capfilt stage NAME ...`) once per rank through the
`deepspeed` launcher (`launch_ranks`); each launched process sees `WORLD_SIZE > 1` in its
environment (`is_launched_rank`) and joins the group. The gather functions that the model's
contrastive losses need are built here (`make_gathers`) and injected into the model: a plain
all-gather without gradient, an autograd-aware one whose backward hands each rank the gradient of
its own slice, and the identity when the world has one member.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from components import children
from components.errors import CapfiltError

log = logging.getLogger(__name__)

Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Gathers:
    """The two gathers a contrastive model needs; both concatenate the ranks' tensors along dim 0."""

    no_grad: Gather  # (B, ...) -> (world·B, ...), detached
    with_grad: Gather  # (B, ...) -> (world·B, ...), gradients flow back to each rank's slice


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_launched_rank() -> bool:
    """True inside a process started by a launcher (deepspeed, torchrun) for a multi-rank job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def init_single_process() -> None:
    """Set the rendezvous variables for a one-process job unless a launcher already set them.

    Without them `deepspeed.init_distributed` tries to discover ranks through mpi4py.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if is_launched_rank():
        return
    # A one-process rendezvous agrees with nobody, so it always takes a fresh port: an inherited
    # MASTER_PORT (e.g. from a parent that trained in-process and still holds its store) would be
    # in use.
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    os.environ.update(single)


def rank_info() -> RankInfo:
    """This process's rank, world size and local rank (an initialised group wins over the env)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return RankInfo(rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world·B, ...): every rank's tensor, in rank order, without gradient."""
    with torch.no_grad():
        return torch.cat(_all_gather(x.detach()), dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums the incoming gradients over ranks and keeps this rank's slice.

    The sum is needed because every rank's loss depends on every rank's slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        return torch.cat(_all_gather(x), dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (world·B, ...): every rank's tensor, gradients flowing back to this rank's slice."""
    return _GatherWithGrad.apply(x)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def make_gathers(world_size: int) -> Gathers:
    """The gathers for a world of `world_size` ranks: identities for one rank."""
    if world_size <= 1:
        return Gathers(no_grad=_identity, with_grad=_identity)
    return Gathers(no_grad=gather_no_grad, with_grad=gather_with_grad)


def use_extensions_dir() -> Path | None:
    """Point torch's JIT-extension cache at the virtualenv, unless it is set already or this is
    not a virtualenv (then torch's default, ~/.cache/torch_extensions); return it.

    DeepSpeed JIT-compiles its CPU shared-memory collective on first use (about a minute cold);
    `make setup` pre-builds it there (`prebuild_ops`) so that no stage pays for it. That holds
    only if every process runs the same `ninja`: a ninja of another version discards the build
    log and compiles everything again (the virtualenv's ninja vs the system's: ~22 s of compiling
    in the first training stage of every pipeline). So the interpreter's own ninja, when it has one, goes first
    on PATH.
    """
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bin_dir) / "ninja").is_file() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    value = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(value) if value else None


def prebuild_ops() -> None:
    """Build (or load from the cache) the DeepSpeed ops a training stage needs on this machine."""
    use_extensions_dir()
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)


def launch_command(
    processes: int,
    argv: list[str],
    hostfile: str | None = None,
    port: int | None = None,
    module: str = "components.cli",
) -> list[str]:
    """The deepspeed launcher command that runs `python -m MODULE ARGV` on every rank."""
    cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if hostfile:
        if not Path(hostfile).is_file():
            raise CapfiltError(f"train.hostfile: {hostfile} not found")
        cmd += ["--hostfile", hostfile]
    else:
        # `--num_gpus` also counts CPU ranks: the CPU accelerator reports one device per NUMA node.
        cmd += ["--num_gpus", str(processes)]
    cmd += ["--master_port", str(port or free_port()), "--no_local_rank", "--module"]
    return cmd + [module, *argv]


def launch_ranks(
    processes: int, argv: list[str], hostfile: str | None = None, module: str = "components.cli"
) -> None:
    """Run `python -m MODULE ARGV` (by default `capfilt ARGV`) as `processes` ranks through the
    deepspeed launcher and wait for all of them."""
    use_extensions_dir()
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a parent's single-process rendezvous must not leak into the ranks
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))
    cmd = launch_command(processes, argv, hostfile, module=module)
    log.info("launching %d ranks: %s", processes, " ".join(cmd))
    proc = children.run(cmd, env=env)
    if proc.returncode != 0:
        raise CapfiltError(
            f"{processes}-rank run of `capfilt {' '.join(argv)}` failed "
            f"(exit code {proc.returncode}); see the ranks' messages above"
        )
