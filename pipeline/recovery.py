"""Recovery: LoRA self-distillation of a CQIL model towards the original (DESIGN.md section 2, recover).

One copy of the weights: peft injects LoRA layers into the loaded model in place. The student is the
CQIL model over those modules (adapters on); the teacher is the same modules under the identity plan
with the adapters disabled, run under no_grad. The loss is the per-token KL(teacher || student) at
temperature 1, so any text works and no labels are needed; `label_weight` > 0 adds the student's own
next-token cross-entropy on the text (what its perplexity measures), weighted.

A run is resumable: a checkpoint holds the LoRA weights, optimizer, scheduler, RNG state, the step
reached and the curves so far; the data order is a pure function of (seed, step), so a resumed run
reproduces the loss curve of an uninterrupted one. Ctrl-C finishes the current step and saves one.

A step runs each row of a micro-batch in a thread of its own, one intra-op thread per row
(`row_threads`), and sums the rows' gradients in row order. A machine with another CPU-bound process
is why: one batch split by OpenMP across every core waits at each operator for its slowest thread,
so a descheduled thread stalls them all (2x slower with one competitor on 2 cores), while rows that
never wait for each other keep every time slice they get (docs/recovery.md measures both). Each row's
arithmetic and the summing order are fixed, so a run gives the same bytes under any load.
"""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from cqil.model.cqil import CqilModel
from cqil.model.divergence import token_kl
from cqil.model.errors import CqilError
from cqil.model.fsutil import atomic_dir
from cqil.model.plan import Plan, identity_plan
from cqil.pipeline.adapters import (
    RUN_RECORD,
    AdaptersOff,
    check_targets_exist,
    lora_config,
)
from cqil.pipeline.quality import evaluate
from cqil.pipeline.recovery_settings import FinetuneSettings
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

RUN_FORMAT = "cqil-finetune/1"
CHECKPOINT_STATE = "state.pt"


MIN_IMPROVEMENT = 0.005  # a held-out KL counts as better when it is at least 0.5 % below the best before


def stalled(kls: list[float], patience: int) -> bool:
    """True when the last `patience` held-out KLs are none of them better than the best before them.

    The held-out chunks are the same at every point, so a flat curve means training no longer helps.
    """
    if patience < 1 or len(kls) <= patience:
        return False
    return min(kls[-patience:]) > min(kls[:-patience]) * (1 - MIN_IMPROVEMENT)


def distill_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over the vocabulary at temperature 1."""
    return token_kl(F.log_softmax(teacher_logits.float(), -1), F.log_softmax(student_logits.float(), -1)).mean()


def label_loss(student_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of the student on the text itself: the log of its perplexity there."""
    return F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def add_gradients(total: list[torch.Tensor | None], more: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """`total` += `more`, elementwise, in place; None is a gradient that was never computed."""
    return [g if t is None else t if g is None else t.add_(g) for t, g in zip(total, more)]


class DataOrder:
    """An endless stream of training chunks, reshuffled every epoch from (seed, epoch) alone."""

    def __init__(self, chunks: torch.Tensor, seed: int, batch_size: int):
        self.chunks = chunks
        self.seed = seed
        self.batch_size = batch_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.chunks), generator=generator)
        return self._perms[epoch]

    def batch(self, index: int) -> torch.Tensor:
        """Micro-batch number `index` of the stream."""
        rows = []
        for position in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, offset = divmod(position, len(self.chunks))
            rows.append(int(self._perm(epoch)[offset]))
        return self.chunks[rows]


class StopOnInterrupt:
    """First Ctrl-C asks the loop to stop after the current step (and checkpoint); a second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc_type is None:  # the loop ended (or stopped early) after a Ctrl-C: still stop
            raise KeyboardInterrupt


@dataclass
class RunState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    held_out: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stopped_early: bool = False


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def default_checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".checkpoint")


def finetune(hf_model: torch.nn.Module, plan: Plan, train: torch.Tensor, held_out: torch.Tensor,
             settings: FinetuneSettings, out: Path, checkpoint_dir: Path | None = None, resume: bool = False,
             source: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train LoRA adapters so that the CQIL model matches the original; save them to `out`.

    Returns the run record that is also written as `out/training_run.json`.
    """
    settings.check(len(train))
    plan.check_fits(hf_model.config)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(out)
    state_file = checkpoint_dir / CHECKPOINT_STATE
    if resume and not state_file.is_file():
        raise CqilError(f"--resume: there is no checkpoint at '{checkpoint_dir}'; run without --resume to start")
    if not resume and state_file.is_file():
        raise CqilError(f"a checkpoint of an earlier run is at '{checkpoint_dir}': pass --resume to continue it, "
                        "or delete it to start over")
    trainer = DistillTrainer(hf_model, plan, train, held_out, settings, source, progress)
    if resume:
        trainer.resume(checkpoint_dir)
    trainer.fit(checkpoint_dir)
    record = trainer.record()
    trainer.save_adapters(out, record)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the run is complete: its checkpoint is spent
    return record


class DistillTrainer:
    """One run of LoRA self-distillation: set up, resume from a checkpoint, step, evaluate, save.

    Construction does what an uninterrupted run does before its first step (the LoRA init draws from the
    seeded RNG), so a resumed trainer only overwrites that state with the checkpoint's.
    """

    def __init__(self, hf_model: torch.nn.Module, plan: Plan, train: torch.Tensor, held_out: torch.Tensor,
                 settings: FinetuneSettings, source: dict[str, Any] | None = None, progress: bool = True):
        self.settings, self.progress = settings, progress
        self.identity = {
            "settings": asdict(settings) | {"targets": list(settings.targets)},
            "plan": plan.to_dict(),
            "seq_len": int(train.shape[1]),
            "train_chunks": len(train),
            "held_out_chunks": min(len(held_out), settings.eval_chunks),
            "model": dict(source or {}),
        }
        check_targets_exist(hf_model, settings.targets)
        torch.manual_seed(settings.seed)
        self.peft_model = get_peft_model(hf_model, lora_config(settings.rank, settings.alpha, settings.dropout,
                                                               settings.targets))
        self.student = CqilModel(hf_model, plan)
        self.original = self.student.with_plan(identity_plan(plan.num_layers))
        self.teacher = AdaptersOff(self.original, self.peft_model)
        # LoRA dropout draws from the one global RNG: rows drawing in turn keep a run reproducible.
        self.row_workers = 1 if settings.dropout > 0 else settings.batch_size
        self.row_threads = max(1, torch.get_num_threads() // self.row_workers)
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, settings.warmup_steps, settings.steps)
        self.order = DataOrder(train, settings.seed, settings.batch_size)
        self.eval_chunks = held_out[: settings.eval_chunks]
        self.tokens_per_step = settings.batch_size * settings.grad_accum * train.shape[1]
        self.run = RunState()

    def resume(self, checkpoint_dir: Path) -> None:
        """Continue the run saved in `checkpoint_dir`; refused when it was another run."""
        saved = load_checkpoint(checkpoint_dir / CHECKPOINT_STATE)
        _check_same_run(saved["identity"], self.identity, checkpoint_dir)
        set_peft_model_state_dict(self.peft_model, saved["lora"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self.run = RunState(**saved["run"])

    def step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches, rows in parallel (module docstring); its loss."""
        settings, started = self.settings, time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        rows_per_step = settings.batch_size * settings.grad_accum
        gradients: list[torch.Tensor | None] = [None] * len(self.trainable)
        loss_sum = 0.0
        with ThreadPoolExecutor(self.row_workers, initializer=torch.set_num_threads,
                                initargs=(self.row_threads,)) as pool:
            for micro in range(settings.grad_accum):
                rows = self.order.batch(self.run.step * settings.grad_accum + micro).split(1)
                with self.peft_model.disable_adapter():  # module state, seen by every thread
                    teacher_logits = list(pool.map(self._teacher_row, rows))
                for loss, row_gradients in pool.map(self._student_row, rows, teacher_logits,
                                                    [rows_per_step] * len(rows)):
                    loss_sum += loss
                    gradients = add_gradients(gradients, row_gradients)
        for parameter, gradient in zip(self.trainable, gradients):
            parameter.grad = gradient
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.run.step += 1
        self.run.losses.append(loss_sum)
        self.run.step_seconds.append(time.perf_counter() - started)
        return loss_sum

    def _teacher_row(self, row: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread
            return self.original(row)[0]

    def _student_row(self, row: torch.Tensor, teacher_logits: torch.Tensor,
                     rows_per_step: int) -> tuple[float, list[torch.Tensor | None]]:
        """This row's share of the step's mean loss and its gradients: tensors of its own, no shared `.grad`
        (None for an adapter the plan never runs, e.g. on a dropped layer, which the optimizer then skips)."""
        logits = self.student(row)[0]
        loss = distill_loss(teacher_logits, logits)
        if self.settings.label_weight:
            loss = loss + self.settings.label_weight * label_loss(logits, row)
        loss = loss / rows_per_step
        return loss.item(), list(torch.autograd.grad(loss, self.trainable, allow_unused=True))

    def evaluate(self) -> dict[str, float]:
        """A held-out point: the student against the teacher, and the original's perplexity."""
        self.peft_model.eval()
        metrics = evaluate(self.teacher, {"cqil": self.student}, self.eval_chunks, self.settings.batch_size,
                           progress=self.progress)
        self.peft_model.train()
        row = metrics["cqil"]
        return {"step": self.run.step, "kl": row["kl"], "ppl": row["ppl"], "top1": row["top1"],
                "original_ppl": metrics["original"]["ppl"]}

    def save(self, checkpoint_dir: Path) -> None:
        """A checkpoint from which `resume` reproduces the rest of the run."""
        with atomic_dir(checkpoint_dir) as tmp:
            torch.save({"identity": self.identity, "run": asdict(self.run),
                        "lora": get_peft_model_state_dict(self.peft_model),
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state()}, tmp / CHECKPOINT_STATE)

    def fit(self, checkpoint_dir: Path) -> None:
        """Step to `settings.steps`, with held-out points, early stopping, checkpoints and Ctrl-C handling."""
        settings, run = self.settings, self.run
        self.peft_model.train()
        if not run.held_out:
            run.held_out.append(self.evaluate())
        with StopOnInterrupt() as stop, tqdm(total=settings.steps, initial=run.step, desc="finetune", unit="step",
                                             disable=not self.progress) as bar:
            while run.step < settings.steps:
                loss = self.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if run.step == settings.steps or (settings.eval_every and run.step % settings.eval_every == 0):
                    point = self.evaluate()
                    run.held_out.append(point)
                    tqdm.write(f"step {run.step}: held-out KL {point['kl']:.4f}, PPL {point['ppl']:.3f} "
                               f"(original {point['original_ppl']:.3f})")
                    run.stopped_early = run.step < settings.steps and stalled([p["kl"] for p in run.held_out],
                                                                             settings.patience)
                    if run.stopped_early:
                        tqdm.write(f"stopping at step {run.step}: no held-out improvement in the last "
                                   f"{settings.patience} points")
                        break
                if stop.requested:
                    self.save(checkpoint_dir)
                    tqdm.write(f"saved a checkpoint at step {run.step} in {checkpoint_dir}; continue with --resume")
                    raise KeyboardInterrupt
                if settings.save_every and run.step % settings.save_every == 0 and run.step < settings.steps:
                    self.save(checkpoint_dir)
        self.peft_model.eval()

    def record(self) -> dict[str, Any]:
        """The run record (training_run.json)."""
        run = self.run
        return {
            "format": RUN_FORMAT,
            **self.identity,
            "steps": run.step,
            "stopped_early": run.stopped_early,
            "tokens_seen": run.step * self.tokens_per_step,
            "tokens_per_step": self.tokens_per_step,
            "losses": run.losses,
            "held_out": run.held_out,
            "seconds_per_step": round(statistics.median(run.step_seconds), 3),
            "seconds_training": round(sum(run.step_seconds), 1),
            "peak_memory_mb": peak_memory_mb(),
            "trainable_parameters": sum(p.numel() for p in self.trainable),
        }

    def save_adapters(self, out: Path, record: dict[str, Any]) -> None:
        """The trained adapters and the run record, as one folder that appears whole."""
        with atomic_dir(out) as tmp:
            self.peft_model.save_pretrained(str(tmp))
            sort_target_modules(tmp / "adapter_config.json")
            (tmp / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def load_checkpoint(state_file: Path) -> dict[str, Any]:
    """A checkpoint's state, read without pickle (torch's weights_only loader: tensors, numbers, strings,
    lists and dicts): a checkpoint that came from elsewhere cannot run code."""
    try:
        saved = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CqilError(f"checkpoint '{state_file}' holds Python objects that only pickle can load; cqil never "
                        "writes those and will not run them: delete the checkpoint to start over") from exc
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CqilError(f"checkpoint '{state_file}' could not be read ({type(exc).__name__}): "
                        "delete it to start over") from exc
    if not isinstance(saved, dict) or not {"identity", "run", "lora", "optimizer", "scheduler", "rng"} <= set(saved):
        raise CqilError(f"checkpoint '{state_file}' is not a cqil finetune checkpoint: delete it to start over")
    return saved


def sort_target_modules(config_file: Path) -> None:
    """peft writes target_modules from a set, in hash order: sort it so the same run gives the same bytes."""
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _check_same_run(saved: dict, current: dict, checkpoint_dir: Path) -> None:
    """A checkpoint resumes only the run that wrote it: same settings, plan, data and model."""
    differ = []
    for key in current:
        if key == "settings":
            differ += [f"--{k.replace('_', '-')}" for k in current[key] if saved[key].get(k) != current[key][k]]
        elif saved.get(key) != current[key]:
            differ.append(key.replace("_", " "))
    if differ:
        raise CqilError(f"the checkpoint in '{checkpoint_dir}' is from a run with another {', '.join(differ)}: "
                        "resume with the same options, or delete it to start over")


def summary_line(record: dict[str, Any]) -> str:
    first, last = record["held_out"][0], record["held_out"][-1]
    return (f"held-out KL {first['kl']:.4f} -> {last['kl']:.4f}, PPL {first['ppl']:.3f} -> {last['ppl']:.3f} "
            f"(original {last['original_ppl']:.3f}); {record['tokens_seen']} tokens, "
            f"{record['seconds_per_step']} s/step, peak {record['peak_memory_mb']} MB")

