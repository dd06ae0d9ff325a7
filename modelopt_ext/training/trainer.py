"""The training loop: batches -> supervision -> the drafter's loss -> data-parallel optimizer steps, with exact resume.

Per optimizer step, on every rank: `grad_accum` micro-batches from this rank's shard (ResumableShardedSampler)
are collated, turned into `Supervision` by the source, scored by the loss, and back-propagated; then the
gradients are averaged over ranks (one bucketed all-reduce per step, which is what DDP does, but
independent of how the loss calls the model), clipped, and AdamW plus the LR schedule step.

What the loop trains on comes from `TrainingParts` (parts.py: built from the recipe by `build_parts`, or by a
test), so the loop itself knows nothing about targets, tokenizers or where supervision comes from.

Stopping: SIGTERM or SIGUSR1 on any rank makes every rank finish the current optimizer step, write a
checkpoint and stop (the CLI then exits 128 + signal number), so a preempted job resumes where it stopped.

Exact resume: a checkpoint holds the weights, optimizer, scheduler, every rank's RNG states and the data
position; resuming restores them all, so an interrupted + resumed run ends bit-identical to an
uninterrupted one (same number of ranks). Test hook: env `MODELOPT_EXT_STOP_AFTER_STEPS=N` stops the run
right after the first checkpoint at or after global step N (simulates an interruption).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from modelopt_ext.config.recipe import Recipe
from modelopt_ext.supply.call_ahead import CallAhead
from modelopt_ext.telemetry.meter import REMOTE, TrainMeter, format_window
from modelopt_ext.telemetry.summary import build_metrics, summary_lines, write_report
from modelopt_ext.training import checkpoint as ckpt
from modelopt_ext.training.distributed import (
    DistEnv,
    all_reduce_mean_,
    all_reduce_sum,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from modelopt_ext.training.parts import PartsFactory, build_parts
from modelopt_ext.training.progress import ProgressTracker
from modelopt_ext.training.sampler import ResumableShardedSampler
from modelopt_ext.training.schedule import build_scheduler

STOP_ENV = "MODELOPT_EXT_STOP_AFTER_STEPS"

@dataclass
class TrainResult:
    """What a run did."""

    global_step: int
    total_steps: int
    checkpoint: Path | None
    export: Path | None
    metrics: dict[str, float]
    stopped_early: bool
    stop_reason: str
    stop_signal: int | None  # set when a signal stopped the run (the CLI exits 128 + it)
    samples_per_s: float
    tokens_per_s: float


def resolve_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """training.dtype -> autocast dtype (None: plain fp32). auto = fp32 on CPU, bf16 on GPU."""
    if dtype == "float32" or (dtype == "auto" and device.type == "cpu"):
        return None
    return torch.bfloat16


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def _scalar(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


def _stop_after() -> int | None:
    raw = os.environ.get(STOP_ENV, "").strip()
    return int(raw) if raw else None


class _StopSignals:
    """SIGTERM/SIGUSR1 (a scheduler's preemption or time-limit warning) ask for a checkpoint and a clean stop
    after the current optimizer step, instead of losing the work since the last checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> _StopSignals:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _log(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, flush=True)


def _broadcast_choice(path: Path | None, error: str, env: DistEnv) -> tuple[Path | None, str]:
    """Rank 0's choice of checkpoint (or its refusal) on every rank, so all ranks resume from the same one
    or all stop with the same error instead of some waiting at the next collective."""
    if not env.distributed:
        return path, error
    import torch.distributed as dist

    box = [str(path) if path else "", error]
    dist.broadcast_object_list(box, src=0)
    return (Path(box[0]) if box[0] else None), box[1]


class Trainer:
    """Runs one training job (fresh or resumed) for a recipe on this process's rank."""

    def __init__(
        self,
        recipe: Recipe,
        parts_factory: PartsFactory,
        resume: str | None = None,
        env: DistEnv | None = None,
    ):
        self.recipe = recipe
        self.cfg = recipe.training
        self.env = env or init_distributed()
        self.out = Path(self.cfg.output_dir)
        # One seed while building (identical initial weights everywhere), then per-rank seeds for training
        # (ranks differ, as they would with dropout; runs repeat).
        ckpt.seed_everything(self.cfg.seed)
        self.resume_from = self._choose_resume(resume)
        self.parts = parts_factory(recipe, self.env, self.resume_from)
        for note in self.parts.notes:
            _log(self.env, note)
        self.model = self.parts.model.to(self.env.device)
        if self.env.distributed:
            self._broadcast_weights()
        ckpt.seed_everything(self.cfg.seed + 1000003 * self.env.rank)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the draft model has no trainable parameters")
        # CPU: the single-tensor loop (foreach=False), the form whose exact resume tests/training checks.
        # CUDA: the fused kernel (one launch for all parameters instead of several per parameter).
        cuda = self.env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, foreach=False, fused=cuda or None
        )
        self.sampler = ResumableShardedSampler(
            len(self.parts.dataset),
            batch_size=self.cfg.batch_size,
            world_size=self.env.world_size,
            rank=self.env.rank,
            grad_accum=self.cfg.grad_accum,
            seed=self.cfg.seed,
        )
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.sampler.steps_per_epoch
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.schedule, self.cfg.warmup_steps, self.total_steps
        )
        self.autocast = resolve_autocast(self.cfg.dtype, self.env.device)
        self.loss_fn = self.parts.loss_fn
        if self.cfg.compile:
            # dynamic: batches are padded to their own longest row, so T changes from step to step.
            self.loss_fn = torch.compile(self.parts.loss_fn, dynamic=True)
        # Telemetry: data wait vs in-process supply vs training, bytes, per-server counters.
        self.meter = TrainMeter.for_parts(self.parts, recipe.data.server_urls or (), self.env.device)
        self.global_step = 0
        self.epoch = 0
        self.position = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        if self.resume_from is not None:
            self._restore(self.resume_from)

    def _choose_resume(self, resume: str | None) -> Path | None:
        """Where this run starts (checkpoint.resolve_resume: the default continues from the newest complete
        checkpoint of the output folder, so a requeued job picks up where it stopped).

        The default and 'never' are decided by rank 0 alone (a checkpoint may land while ranks look, and
        only one rank may move old checkpoints aside); an explicit path is validated on every rank too."""
        explicit = resume not in (None, "", ckpt.RESUME_AUTO, ckpt.RESUME_NEVER)
        chosen, error = None, ""
        if self.env.is_main or explicit:
            try:
                chosen = ckpt.resolve_resume(resume, self.out)
                if resume == ckpt.RESUME_NEVER and self.env.is_main:
                    moved = ckpt.set_aside_checkpoints(
                        self.out, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
                    )
                    if moved is not None:
                        _log(self.env, f"resume: never: the earlier checkpoints were moved to {moved}")
            except ckpt.CheckpointError as e:
                error = str(e)
        chosen, error_main = _broadcast_choice(chosen, error, self.env)
        if error or error_main:
            raise ckpt.CheckpointError(error or error_main)
        if chosen is None and resume != ckpt.RESUME_NEVER:
            _log(self.env, f"resume: no checkpoint in {self.out}, starting fresh")
        return chosen

    @torch.no_grad()
    def _broadcast_weights(self) -> None:
        """Rank 0's initial weights (and buffers) on every rank, whatever each rank's init did."""
        import torch.distributed as dist

        for t in self.model.state_dict().values():
            if t.dtype == torch.bool:  # gloo has no bool collectives
                tmp = t.to(torch.uint8)
                dist.broadcast(tmp, src=0)
                t.copy_(tmp.bool())
            else:
                dist.broadcast(t, src=0)

    # --- resume ----------------------------------------------------------------------------------------

    def _restore(self, path: Path) -> None:
        loaded = ckpt.load_checkpoint(path, rank=self.env.rank, map_location=self.env.device)
        st = loaded.trainer_state
        missing, unexpected = self.model.load_state_dict(loaded.model_state, strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(
                f"{path}: model weights do not fit the draft model (missing {missing}, unexpected {unexpected})"
            )
        self.optimizer.load_state_dict(loaded.optimizer_state)
        self.scheduler.load_state_dict(loaded.scheduler_state)
        if st.get("total_steps") not in (None, self.total_steps):
            # load_state_dict restored the old schedule length into the multiplier; the recipe wins.
            for fn in self.scheduler.lr_lambdas:
                fn.total_steps = self.total_steps
            _log(
                self.env,
                f"resume: warning: total steps changed {st['total_steps']} -> {self.total_steps} "
                "(the LR schedule continues with the new length; not bit-identical to either run)",
            )
        self.global_step = st["global_step"]
        self.epoch = st["epoch"]
        self.position = st["data_position"]
        self.samples_seen = int(st.get("samples_seen", 0))
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.last_metrics = dict(st.get("metrics", {}))
        if st["world_size"] != self.env.world_size:
            _log(
                self.env,
                f"resume: warning: checkpoint written by {st['world_size']} ranks, now "
                f"{self.env.world_size}; data continues at the same position, but the run is not "
                "bit-identical to an uninterrupted one",
            )
        if loaded.rng_state is not None and st["world_size"] == self.env.world_size:
            ckpt.restore_rng_state(loaded.rng_state)
        if self.position >= self.sampler.epoch_length:
            self.epoch, self.position = self.epoch + 1, 0
        try:
            self.sampler.set_epoch(self.epoch, self.position)
        except ValueError as e:
            raise ckpt.CheckpointError(
                f"{path}: {e} (batch_size/grad_accum changed since the checkpoint?)"
            ) from None
        self.last_checkpoint = path
        _log(
            self.env,
            f"resume: from {path} (global step {self.global_step}, epoch {self.epoch}, "
            f"data position {self.position})",
        )

    # --- one optimizer step ------------------------------------------------------------------------------

    def _micro_step(self, batch: dict[str, torch.Tensor], sup: Any = None) -> tuple[dict[str, float], int, int]:
        """One forward/backward; `sup`: the batch's supervision when it was fetched ahead (already on device)."""
        ctx = torch.autocast(self.env.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        if sup is None:
            batch = _to_device(batch, self.env.device)
            # The source runs outside autocast: it must compute exactly what a remote server would.
            sup = self.meter.fetch(self.parts.source, batch)
        with ctx:
            loss, metrics = self.loss_fn(
                self.model,
                sup,
                self.parts.vocab,
                self.parts.head,
            )
        (loss / self.cfg.grad_accum).backward()
        out = {"loss": _scalar(loss)}
        out.update({k: _scalar(v) for k, v in metrics.items() if k != "loss"})
        tokens = (
            int(batch["attention_mask"].sum())
            if "attention_mask" in batch
            else int(batch["input_ids"].numel())
        )
        return out, int(batch["input_ids"].shape[0]), tokens

    def _optimizer_step(self) -> float | None:
        for p in self.params:
            if p.grad is None:  # a parameter this step did not reach: same zeros on every rank
                p.grad = torch.zeros_like(p)
        self.meter.synced(all_reduce_mean_, [p.grad for p in self.params], self.env)
        grad_norm = None
        if self.cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # --- the loop --------------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        # A private generator: DataLoader draws its worker base seed from the GLOBAL torch RNG at every
        # iter() otherwise, and a resumed run creates its iterator at a different point than an
        # uninterrupted one, which would shift the training RNG stream (dropout) and break bit-identity.
        gen = torch.Generator()
        gen.manual_seed(self.cfg.seed * 1_000_003 + self.epoch * 7919 + self.env.rank)
        return DataLoader(
            self.parts.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.parts.collate,
            num_workers=self.recipe.data.num_workers,
            pin_memory=self.env.device.type == "cuda",
            persistent_workers=False,
            generator=gen,
        )

    def _supervised_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], Any]]:
        """(batch, supervision or None) in the loader's order. A remote source is called ahead in a thread
        (`data.call_ahead` batches; supply/call_ahead.py) so its fetch overlaps the step; the trainer's wait
        for it is data wait. Other sources are called in the step (None here)."""
        depth = self.recipe.data.call_ahead
        if self.meter.kind != REMOTE or depth < 1:
            for batch in self.meter.timed(self._loader()):
                yield batch, None
            return
        ahead = CallAhead(
            self._loader(),
            self.parts.source,
            prepare=lambda b: _to_device(b, self.env.device),
            depth=depth,
        )
        with closing(self.meter.timed(ahead)) as stream:
            for batch, sup, call_s, url in stream:
                self.meter.account(batch, sup, call_s, url)
                yield batch, sup

    def train(self) -> TrainResult:
        """Run to `total_steps`, or until a stop signal / the stop hook; checkpoint, export and summarise."""
        with _StopSignals() as signals:
            return self._train(signals)

    def _train(self, signals: _StopSignals) -> TrainResult:
        env, cfg = self.env, self.cfg
        if hasattr(self.parts.source, "stop_requested"):
            # A source that waits for servers gives up once a stop signal came (see FailoverRemoteSource).
            self.parts.source.stop_requested = lambda: signals.received is not None
        stop_after = _stop_after()
        stop_reason = ""
        stop_signal: int | None = None
        progress = ProgressTracker(
            total_steps=self.total_steps,
            start_step=self.global_step,
            output_dir=self.out if env.is_main else None,
            enabled=env.is_main,
        )
        _log(
            env,
            f"train: {self.total_steps} steps ({self.sampler.steps_per_epoch}/epoch), {env.world_size} "
            f"rank(s) x batch {cfg.batch_size} x accum {cfg.grad_accum} = {self.sampler.samples_per_step} "
            f"samples/step, device {env.device}, "
            f"{'bf16 autocast' if self.autocast else 'fp32'}, {sum(p.numel() for p in self.params):,} trainable params",
        )
        stopped = False
        self.meter.start()
        window: dict[str, float] = {}
        window_n = 0
        while self.global_step < self.total_steps and not stopped:
            self.sampler.set_epoch(self.epoch, self.position)
            micro = 0
            step_metrics: dict[str, float] = {}
            step_samples = step_tokens = 0
            batches = self._supervised_batches()
            for batch, sup in batches:
                m, ns, nt = self._micro_step(batch, sup)
                for k, v in m.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / cfg.grad_accum
                step_samples += ns
                step_tokens += nt
                micro += 1
                if micro % cfg.grad_accum:
                    continue
                grad_norm = self._optimizer_step()
                self.global_step += 1
                self.position = self.sampler.advance(cfg.grad_accum)
                for k, v in step_metrics.items():
                    window[k] = window.get(k, 0.0) + v
                if grad_norm is not None:
                    window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
                window_n += 1
                # One tiny all-reduce per step counts all ranks' work and tells every rank whether any of
                # them was asked to stop, so all of them checkpoint the same step.
                tot_samples, tot_tokens, signalled = all_reduce_sum(
                    [float(step_samples), float(step_tokens), float(signals.received is not None)], env
                )
                self.samples_seen += int(tot_samples)
                self.tokens_seen += int(tot_tokens)
                progress.add(tot_samples, tot_tokens)
                step_metrics, step_samples, step_tokens = {}, 0, 0
                last = self.global_step >= self.total_steps
                if self.global_step % cfg.log_interval == 0 or last:
                    self.last_metrics = self._reduce_window(window, window_n)
                    tele, _ = self.meter.window(env)
                    progress.log(
                        self.global_step,
                        self.epoch,
                        self.last_metrics,
                        self.scheduler.get_last_lr()[0],
                        telemetry=(*format_window(tele, self.meter.kind), tele.record()),
                    )
                    window, window_n = {}, 0
                if signalled and not last:
                    stop_reason = f"stop signal {signals.name or 'on another rank'}"
                    stop_signal = signals.received or int(signal.SIGTERM)
                    stopped = True
                if self.global_step % cfg.save_interval == 0 or last or stopped:
                    self.save()
                    if stop_after is not None and self.global_step >= stop_after and not last:
                        stop_reason = stop_reason or f"{STOP_ENV}={stop_after}"
                        stopped = True
                if last or stopped:
                    batches.close()  # stops a fetch running ahead
                    break
            else:
                self.epoch, self.position = self.epoch + 1, 0
        self.meter.stop()  # the export is not training time
        export = None
        if not stopped and cfg.export_at_end and self.last_checkpoint is not None:
            export = self._export()
        barrier(env)
        sps, tps = progress.rates()
        report = build_metrics(
            self.meter.aggregate(env),  # collective: every rank
            kind=self.meter.kind,
            global_step=self.global_step,
            start_step=progress.start_step,
            total_steps=self.total_steps,
            samples=progress.samples,
            tokens=progress.tokens,
            wall_s=progress.elapsed,
            final_metrics=self.last_metrics,
            num_workers=self.recipe.data.num_workers,
            checkpoint=self.last_checkpoint,
            export=export,
            stopped_early=stopped,
        )
        text = progress.summary(
            self.global_step,
            self.last_checkpoint,
            export,
            note=stop_reason,
            extra_lines=summary_lines(report),
        )
        if env.is_main:
            write_report(self.out, report, text)
        return TrainResult(
            global_step=self.global_step,
            total_steps=self.total_steps,
            checkpoint=self.last_checkpoint,
            export=export,
            metrics=self.last_metrics,
            stopped_early=stopped,
            stop_reason=stop_reason,
            stop_signal=stop_signal,
            samples_per_s=sps,
            tokens_per_s=tps,
        )

    def _reduce_window(self, window: dict[str, float], n: int) -> dict[str, float]:
        """Mean of each metric over the steps since the last log line and over ranks."""
        keys = sorted(window)
        means = [window[k] / max(n, 1) for k in keys]
        summed = all_reduce_sum(means, self.env)
        return {k: v / self.env.world_size for k, v in zip(keys, summed)}

    # --- checkpoint and export ------------------------------------------------------------------------

    def trainer_state(self) -> dict[str, Any]:
        """The JSON-ready progress record saved with each checkpoint."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "data_position": self.position,
            "epoch_length": self.sampler.epoch_length,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "total_steps": self.total_steps,
            "world_size": self.env.world_size,
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "seed": self.cfg.seed,
            "metrics": self.last_metrics,
        }

    def save(self) -> Path:
        """Write `epoch_E_step_S/` (collective: every rank calls it)."""
        content = None
        if self.env.is_main:
            content = ckpt.CheckpointContent(
                model_state=self.model.state_dict(),
                model_config={**self.parts.model_config, "target_model": self.recipe.model.path},
                vocab=self.parts.vocab,
                optimizer_state=self.optimizer.state_dict(),
                scheduler_state=self.scheduler.state_dict(),
                trainer_state=self.trainer_state(),
                recipe=self.recipe.model_dump(mode="json"),
            )
        path = ckpt.save_checkpoint(self.out, self.epoch, self.global_step, self.env, content)
        self.last_checkpoint = path
        _log(self.env, f"checkpoint: {path}")
        return path

    def _export(self) -> Path | None:
        if not self.env.is_main:
            return None
        if self.parts.export_fn is None:
            print("export: skipped (modelopt_ext.deploy.export is not available)", flush=True)
            return None
        out = self.out / "export"
        path = Path(self.parts.export_fn(self.last_checkpoint, out))
        print(f"export: {path}", flush=True)
        return path


def train(
    recipe: Recipe, parts_factory: PartsFactory | None = None, resume: str | None = None
) -> TrainResult:
    """Train a drafter for `recipe` on this process (and its process group, when launched with several)."""
    if parts_factory is None:
        parts_factory = build_parts
    env = init_distributed()
    try:
        return Trainer(recipe, parts_factory, resume=resume, env=env).train()
    finally:
        sys.stdout.flush()
        shutdown_distributed()
