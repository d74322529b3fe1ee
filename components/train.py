"""The one training loop: every training stage (pretrain, both fine-tunes, retrain) runs through it.

`run_training` wires a model, an objective and a batch source to DeepSpeed: it joins (or starts)
the process group, builds the model with the same seed on every rank and injects the gathers,
builds torch AdamW with weight-decay groups and the learning-rate schedule, hands them to
`deepspeed.initialize`, resumes from the latest complete checkpoint of the same run (weights,
optimiser, schedule, RNG states and data position), and then steps: `grad_accum` micro-batches
per optimizer step, each `objective(engine, batch, step) -> (loss, parts)`. Stages differ only
in the objective they pass. It checkpoints every `checkpoint_every` steps and at the end, stops
with a CapfiltError on a non-finite loss, and on rank 0 writes `metrics.json` and `loss.csv` and
forwards the same numbers to an optional `log_metrics(dict, step)` callable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from components import checkpoints as ckpt
from components import distributed as D
from components.config import ScheduleConfig, TrainConfig
from components.errors import CapfiltError
from components.hardware import warn_emulated_bf16
from components.optim import build_optimizer, build_scheduler, deepspeed_config, lr_at
from components.optim import loop_clips, resolve_precision
from components.train_state import RunClock, capture_rng, restore_rng, seed_everything
from components.train_state import write_loss_csv, write_metrics

log = logging.getLogger(__name__)

Objective = Callable[[nn.Module, Any, int], tuple[torch.Tensor, dict[str, float]]]
LogMetrics = Callable[[dict[str, float], int], None]
BuildModel = Callable[[D.Gathers], nn.Module]


class BatchSource(Protocol):
    """This rank's batches for one pass over the data, in a deterministic order."""

    def batches(self, epoch: int, skip: int) -> Iterator[Any]:
        """Batches of epoch `epoch`, leaving out its first `skip` ones (a resumed run)."""
        ...


@dataclass(frozen=True)
class TrainResult:
    """What a finished run hands back; `state_dict` is the full fp32 state on rank 0 (else empty)."""

    steps: int
    final_loss: float
    final_parts: dict[str, float]
    metrics: dict[str, float]
    module: nn.Module
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    rank: int = 0
    resumed_from: int = 0


@dataclass
class _Position:
    """Where the run is: optimizer steps done, epoch, batches of that epoch already consumed."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def fingerprint_of(cfg: TrainConfig, schedule: ScheduleConfig, extra: str = "") -> str:
    """A hash of everything that changes a run's result (not its logging or checkpoint cadence)."""
    ignore = {"resume", "log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "threads"}
    payload = {
        "train": {k: v for k, v in cfg.model_dump().items() if k not in ignore},
        "schedule": schedule.model_dump(),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _init_process_group(cfg: TrainConfig) -> D.RankInfo:
    import deepspeed

    D.use_extensions_dir()
    if not D.is_launched_rank():
        if cfg.processes > 1 and not cfg.hostfile:
            raise CapfiltError(
                f"train.processes={cfg.processes}: start the ranks with the deepspeed launcher "
                "(`capfilt stage NAME` does this)"
            )
        D.init_single_process()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(verbose=False)
    info = D.rank_info()
    local = int(os.environ.get("LOCAL_SIZE", str(min(info.world_size, os.cpu_count() or 1))))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local)))
    return info


def _to_device(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """Move a batch (a tensor, a `.to(device, dtype)` object, or lists/dicts of them) to the
    engine's device; floating tensors take the engine's half dtype when it trains in bf16/fp16."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device)
        return batch.to(dtype) if dtype is not None and batch.is_floating_point() else batch
    if hasattr(batch, "to"):
        return batch.to(device, dtype)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device, dtype) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in batch.items()}
    return batch


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether every rank's loss is finite (the flag lives on the loss's device, for NCCL)."""
    ok = torch.isfinite(loss.detach()).all().float().reshape(1)
    if world > 1:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item() > 0)


def _mean_over_ranks(values: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / world for k, v in zip(keys, t.tolist())}


class _Stream:
    """Endless micro-batches across epochs, tracking the position for checkpoints."""

    def __init__(self, data: BatchSource, pos: _Position) -> None:
        self.data, self.pos = data, pos
        self.it = iter(data.batches(pos.epoch, pos.consumed))

    def next(self) -> Any:
        for _ in range(2):
            try:
                batch = next(self.it)
                self.pos.consumed += 1
                return batch
            except StopIteration:
                self.pos.epoch, self.pos.consumed = self.pos.epoch + 1, 0
                self.it = iter(self.data.batches(self.pos.epoch, 0))
        raise CapfiltError("the training data yields no batch: fewer samples than one global batch?")


def _broadcast_flat(engine: Any) -> None:
    """Rank 0's parameters to every rank, 0-dim ones included (see `_scalar_safe_broadcast`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in engine.module.parameters():
        if not hasattr(p, "ds_status"):  # ZeRO-3 partitioned parameters are not replicated
            dist.broadcast(p.data.view(-1), src=0)


@contextmanager
def _scalar_safe_broadcast() -> Iterator[None]:
    """DeepSpeed 0.19 broadcasts each parameter as `p.data.view(torch.uint8)`, which raises for a
    0-dim parameter such as BLIP's ITC temperature; broadcast them flattened instead."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = _broadcast_flat
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def _lift_scalars(model: nn.Module) -> None:
    """ZeRO-3 cannot partition 0-dim parameters (BLIP's ITC temperature): make them shape (1,),
    which broadcasts the same; `_full_state` gives them back their scalar shape on export."""
    lifted = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            setattr(module, leaf, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
            lifted.append(name)
    model.capfilt_lifted_scalars = tuple(lifted)


def _momentum_step(module: nn.Module, cfg: TrainConfig) -> None:
    """The model's temperature clamp + momentum EMA (see `BlipEncoderBase.momentum_step`), run
    before each forward. Under ZeRO-3 it gathers the parameters it touches a group at a time, and
    rank 0's result (every rank computes the same) is partitioned back."""
    step = getattr(module, "momentum_step", None)
    if step is None:
        return
    if cfg.zero_stage != 3:
        step()
        return
    import deepspeed

    step(lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))


def _build_engine(cfg: TrainConfig, schedule: ScheduleConfig, build_model: BuildModel, info: D.RankInfo):
    import deepspeed

    seed_everything(cfg.seed)  # the same initial weights and buffers on every rank
    model = build_model(D.make_gathers(info.world_size))
    if hasattr(model, "momentum_step"):
        model.momentum_in_forward = False  # the loop calls it, gathered under ZeRO-3 (`_momentum_step`)
    if cfg.zero_stage == 3:
        _lift_scalars(model)
    precision = resolve_precision(cfg.precision)
    if precision == "bf16" and not torch.cuda.is_available():
        warn_emulated_bf16("train.precision")
    if precision in _HALF:  # buffers too (ITC queues): DeepSpeed converts parameters only
        model = model.to(_HALF[precision])
    optimizer = build_optimizer(model, cfg, schedule)
    scheduler = build_scheduler(optimizer, schedule)
    with _scalar_safe_broadcast():
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, precision)
        )
    seed_everything(cfg.seed + info.rank)  # each rank its own stream (dropout, ITM negatives)
    log.info("model %s: %.2f M trainable parameters, %s, ZeRO %d, %d rank(s)",
             type(model).__name__, sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
             precision, cfg.zero_stage, info.world_size)
    return engine


def _resume(engine: Any, resume_dir: Path, fingerprint: str, cfg: TrainConfig, info: D.RankInfo) -> _Position:
    box: list[Any] = [None]
    if info.rank == 0:
        box[0] = ckpt.prepare_resume_dir(resume_dir, fingerprint, cfg.resume)
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    tag = box[0]
    if tag is None:
        return _Position()
    engine.load_checkpoint(str(resume_dir), tag=tag, load_optimizer_states=True,
                           load_lr_scheduler_states=True)
    state = ckpt.load_rank_state(ckpt.rank_state_file(resume_dir / tag, info.rank))
    restore_rng(state["rng"])
    pos = _Position(step=int(state["step"]), epoch=int(state["epoch"]), consumed=int(state["consumed"]),
                    history=[dict(r) for r in state["history"]])
    log.info("resumed from %s: step %d, epoch %d, batch %d", resume_dir / tag, pos.step, pos.epoch,
             pos.consumed)
    return pos


def _save(engine: Any, resume_dir: Path, pos: _Position, cfg: TrainConfig, info: D.RankInfo) -> None:
    tag = ckpt.temp_tag(pos.step)
    engine.save_checkpoint(str(resume_dir), tag=tag, client_state={}, save_latest=False)
    (resume_dir / tag).mkdir(parents=True, exist_ok=True)
    ckpt.save_rank_state(ckpt.rank_state_file(resume_dir / tag, info.rank), {
        "step": pos.step, "epoch": pos.epoch, "consumed": pos.consumed,
        "history": pos.history if info.rank == 0 else [], "rng": capture_rng(),
    })
    if info.world_size > 1:
        dist.barrier()
    if info.rank == 0:
        ckpt.publish(resume_dir, pos.step, cfg.keep_checkpoints)
    if info.world_size > 1:
        dist.barrier()


def _one_step(engine: Any, stream: _Stream, objective: Objective, step: int, cfg: TrainConfig,
              world: int) -> dict[str, float]:
    """`grad_accum` forward/backward passes and one optimizer step; the mean loss and parts."""
    sums: dict[str, float] = {}
    precision = resolve_precision(cfg.precision)
    clip, dtype = loop_clips(cfg, precision), _HALF.get(precision)
    for _ in range(cfg.grad_accum):
        batch = _to_device(stream.next(), engine.device, dtype)
        _momentum_step(engine.module, cfg)
        loss, parts = objective(engine, batch, step)
        if not _all_finite(loss, world):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
            raise CapfiltError(f"non-finite loss at step {step}: loss={loss.item():.4g} ({shown}); "
                               "lower the learning rate or check the data; nothing was saved")
        engine.backward(loss)
        if clip and engine.is_gradient_accumulation_boundary():  # grads are all-reduced by now
            torch.nn.utils.clip_grad_norm_(engine.module.parameters(), cfg.grad_clip)
        engine.step()
        for key, value in {"loss": float(loss.item()), **parts}.items():
            sums[key] = sums.get(key, 0.0) + float(value) / cfg.grad_accum
    return sums


def _full_state(engine: Any, cfg: TrainConfig, rank: int) -> dict[str, torch.Tensor]:
    """The module's full state dict on rank 0, also under ZeRO-3 (a collective: every rank calls)."""
    module = engine.module
    if cfg.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        for name in getattr(module, "capfilt_lifted_scalars", ()):
            state[name] = state[name].reshape(())
    else:
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return state if rank == 0 else {}


def run_training(
    cfg: TrainConfig,
    schedule: ScheduleConfig,
    build_model: BuildModel,
    objective: Objective,
    data: BatchSource,
    out_dir: Path | str,
    log_metrics: LogMetrics | None = None,
    *,
    resume_dir: Path | str | None = None,
    fingerprint: str = "",
) -> TrainResult:
    """Train `build_model(gathers)` for `schedule.steps` optimizer steps on `data` with `objective`.

    Writes `metrics.json` and `loss.csv` into `out_dir` (rank 0) and resume checkpoints into
    `resume_dir` (default `out_dir/resume`); `fingerprint` names the data and model so that a
    changed run never resumes another's checkpoints.
    """
    out_dir = Path(out_dir)
    resume_dir = Path(resume_dir) if resume_dir is not None else out_dir / "resume"
    info = _init_process_group(cfg)
    engine = _build_engine(cfg, schedule, build_model, info)
    pos = _resume(engine, resume_dir, fingerprint_of(cfg, schedule, fingerprint), cfg, info)
    start_step, stream = pos.step, _Stream(data, pos)
    clock = RunClock(global_batch=cfg.micro_batch * cfg.grad_accum * info.world_size)
    bar = _progress(schedule.steps, pos.step, info.rank)
    last: dict[str, float] = {}
    while pos.step < schedule.steps:
        engine.train()
        values = _one_step(engine, stream, objective, pos.step, cfg, info.world_size)
        lr = lr_at(pos.step, schedule)
        pos.step += 1
        clock.tick()
        if pos.step % cfg.log_every == 0 or pos.step == schedule.steps:
            last = _mean_over_ranks(values, info.world_size, engine.device)
            _report(pos, last, lr, clock, bar, info.rank, log_metrics)
        if pos.step % cfg.checkpoint_every == 0 or pos.step == schedule.steps:
            _save(engine, resume_dir, pos, cfg, info)
    if bar is not None:
        bar.close()
    if not last and pos.history:
        last = {k: v for k, v in pos.history[-1].items() if k not in ("step", "lr")}
    metrics = clock.summary(last, pos.step, start_step)
    if info.rank == 0:
        write_loss_csv(out_dir / "loss.csv", pos.history)
        write_metrics(out_dir / "metrics.json", metrics)
        if log_metrics is not None:
            log_metrics(metrics, pos.step)
    return TrainResult(steps=pos.step, final_loss=float(last.get("loss", float("nan"))),
                       final_parts={k: v for k, v in last.items() if k != "loss"}, metrics=metrics,
                       module=engine.module, state_dict=_full_state(engine, cfg, info.rank),
                       rank=info.rank, resumed_from=start_step)


def _progress(total: int, initial: int, rank: int) -> Any:
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise None (plain log lines)."""
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _report(pos: _Position, values: dict[str, float], lr: float, clock: RunClock, bar: Any, rank: int,
            log_metrics: LogMetrics | None) -> None:
    if rank != 0:
        return
    row = {"step": float(pos.step), **values, "lr": lr}
    pos.history.append(row)
    if log_metrics is not None:
        log_metrics({**values, "lr": lr}, pos.step)
    rate = clock.samples_per_s()
    if bar is not None:
        bar.update(pos.step - bar.n)
        bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
    else:
        parts = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "loss")
        log.info("step %d loss=%.4f %s lr=%.3g %.1f samples/s", pos.step, values["loss"], parts, lr, rate)
