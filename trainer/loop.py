"""The Hugging Face `Trainer`, fitted to xstilts runs:

- StiltsTrainer: the training data loader comes from the multi-task, length-grouped batch
  sampler; `evaluate` (called by the Trainer for model selection) scores every English dev set
  with evaluate.py's length-batched, rank-sharded predictor and names the numbers
  "eval_<metric>" for the Trainer and "dev.<metric>" for MLflow.
- RunCallback: progress.json, training loss and learning rate to MLflow, and the stop at a
  step boundary when a signal came (all ranks agree, save a checkpoint together, then stop).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from xstilts.trainer.batching import Collator, MultiTaskBatchSampler, TrainSet
from xstilts.trainer.data import ENGLISH
from xstilts.trainer.evaluate import Predictor, dev_metrics, eval_token_budget, evaluate_splits
from xstilts.trainer.features import Encoded
from xstilts.trainer.hf_seams import SeamTrainer
from xstilts.trainer.interrupt import Interruption, RunInterrupted
from xstilts.trainer.rundir import ProgressFile, eta_seconds, write_atomic
from xstilts.trainer.tasks import Task

MAX_EVAL_ROWS = 1024


class RunCallback(TrainerCallback):
    def __init__(self, progress: ProgressFile, tracker: Any, interruption: Interruption) -> None:
        self.progress = progress
        self.tracker = tracker
        self.interruption = interruption
        self.tokens_at_start = 0
        self.step_at_start = 0
        self.started = time.monotonic()
        self.loss: float | None = None
        self.stopping = False
        # Throughput counts the seconds of training steps only: up to the last step's end, less
        # the dev evaluations and checkpoint saves in between (they pause training, and their
        # share shrinks with the run's length, so counting them would make rates incomparable).
        self.paused = 0.0
        self.train_seconds = 0.0
        # The same span in process CPU seconds: on a machine shared with other work the rate
        # by CPU time stays steady where the rate by wall time follows the neighbours' load.
        self.cpu_started = time.process_time()
        self.cpu_paused = 0.0
        self.train_cpu_seconds = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # a resumed run starts from the checkpoint's counts: rates and ETA are this attempt's
        self.tokens_at_start = state.num_input_tokens_seen
        self.step_at_start = state.global_step
        self.started = time.monotonic()
        self.paused = 0.0
        self.train_seconds = 0.0
        self.cpu_started = time.process_time()
        self.cpu_paused = 0.0
        self.train_cpu_seconds = 0.0

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time spent in the block is not training time."""
        began, cpu_began = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.paused += time.monotonic() - began
            self.cpu_paused += time.process_time() - cpu_began

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.train_seconds = time.monotonic() - self.started - self.paused
        self.train_cpu_seconds = time.process_time() - self.cpu_started - self.cpu_paused
        done, todo = state.global_step - self.step_at_start, state.max_steps - self.step_at_start
        self.progress.update(
            force=state.global_step >= state.max_steps, step=state.global_step, total_steps=state.max_steps,
            epoch=round(state.epoch or 0.0, 3), loss=self.loss, tokens_seen=int(state.num_input_tokens_seen),
            eta_s=eta_seconds(time.monotonic() - self.started, done, todo), phase="train")
        if self._stop_agreed(args):
            self.stopping = True
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopping:  # the checkpoint that a retry resumes from is written: leave now
            raise RunInterrupted(self.interruption.requested or signal.SIGTERM)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.loss = round(float(logs["loss"]), 5)
        train = {f"train.{k}": float(logs[k]) for k in ("loss", "learning_rate", "grad_norm", "mlm_loss")
                 if k in logs}
        if train:
            self.tracker.log_metrics(train, step=state.global_step)

    def _stop_agreed(self, args: Any) -> bool:
        """Whether any rank got a signal: every rank must stop at the same step, since saving
        a checkpoint (and every ZeRO step) is collective."""
        requested = self.interruption.requested is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        return requested


class StiltsTrainer(SeamTrainer):
    """Uses the Trainer's public API only; every override of its internals (the resume
    checkpoints, the sampler's epoch) is in SeamTrainer, hf_seams.py."""

    control: Any  # the Trainer's TrainerControl, passed through the callbacks by evaluate()

    def __init__(self, *, model: Any, args: Any, train_set: TrainSet, sampler: MultiTaskBatchSampler,
                 collator: Collator, dev: Sequence[Encoded], tasks: Sequence[Task], eval_cap: int | None,
                 tracker: Any, progress: ProgressFile, eval_tokens: int, callback: RunCallback,
                 target_dev: Sequence[Encoded] = (), test: Sequence[Encoded] = (),
                 selection_file: Path | None = None, mlm_task_index: int | None = None) -> None:
        super().__init__(model=model, args=args, train_dataset=train_set, data_collator=collator,
                         eval_dataset={e.ref.task: e.features for e in dev}, callbacks=[callback])
        self.batch_sampler = sampler
        self.dev = list(dev)
        self.tasks = list(tasks)
        self.eval_cap = eval_cap
        self.tracker = tracker
        self.progress = progress
        self.eval_tokens = eval_tokens
        self.run_callback = callback
        # Target-dev selection: a target run with dev sets in its other languages also scores
        # them and its test sets at every evaluation (one pooled pass), so that the test scores
        # at the step each language's dev set prefers are known without keeping every checkpoint.
        self.target_dev = list(target_dev) if test else []
        self.test = list(test) if self.target_dev else []
        self.selection_file = selection_file
        # Continued MLM (trainer/mlm.py): its batches' loss, apart from the tasks', between two
        # logging steps (this process's micro-batches; every rank gets a share of each MLM step).
        self.mlm_task_index = mlm_task_index
        self.mlm_loss_sum: torch.Tensor | None = None
        self.mlm_batches = 0
        self.selection_history: list[dict[str, Any]] = []
        if selection_file is not None and selection_file.is_file():  # a resumed run keeps its earlier steps
            self.selection_history = json.loads(selection_file.read_text(encoding="utf-8"))

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        loader = torch.utils.data.DataLoader(
            self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory)
        # accelerate deals the sampler's batches to the ranks in turn (see MultiTaskBatchSampler)
        return self.accelerator.prepare(loader)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.mlm_task_index is not None and int(inputs["task_index"][0]) == self.mlm_task_index:
            loss = (result[0] if return_outputs else result).detach()  # no device sync here
            self.mlm_loss_sum = loss if self.mlm_loss_sum is None else self.mlm_loss_sum + loss
            self.mlm_batches += 1
        return result

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.mlm_loss_sum is not None and self.mlm_batches:
            logs = {**logs, "mlm_loss": round(float(self.mlm_loss_sum) / self.mlm_batches, 4)}
            self.mlm_loss_sum, self.mlm_batches = None, 0
        super().log(logs, start_time)

    def checkpoint_pause(self) -> contextlib.AbstractContextManager[None]:
        return self.run_callback.pause()

    def predictor(self) -> Predictor:
        model = self.model_wrapped

        def forward(batch: dict[str, torch.Tensor]) -> Any:
            with self.autocast_smart_context_manager():
                return model(**batch)

        tokens = eval_token_budget(self.eval_tokens, self.args.device)
        return Predictor(forward, self.data_collator, self.args.device, self.args.process_index,
                         self.args.world_size, max_tokens=tokens, max_rows=min(MAX_EVAL_ROWS, tokens))

    def evaluate_split(self, encoded: Encoded, task_index: int) -> dict[str, float]:
        return self.evaluate_splits([encoded], task_index)[0]

    def evaluate_splits(self, splits: Sequence[Encoded], task_index: int,
                        records: list[list[dict[str, Any]]] | None = None) -> list[dict[str, float]]:
        """The metrics of several splits of one task, predicted in one pass (a target's test
        languages)."""
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        try:
            return evaluate_splits(self.predictor(), splits, task_index, self.eval_cap, records)
        finally:
            if was_training:
                model.train()

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        self.progress.update(force=True, phase="eval")
        with self.run_callback.pause():
            per_task = {e.ref.task: self.evaluate_split(e, i) for i, e in enumerate(self.dev)}
            if self.target_dev:
                self._record_selection(per_task)
        flat = dev_metrics(self.tasks, per_task)
        self.tracker.log_metrics(flat, step=self.state.global_step)
        metrics = {f"{metric_key_prefix}_{k.removeprefix('dev.').replace('.', '_')}": v for k, v in flat.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self.progress.update(force=True, phase="train")
        return metrics

    def _record_selection(self, per_task: dict[str, dict[str, float]]) -> None:
        metric = self.tasks[0].metric
        scores = self.evaluate_splits([*self.target_dev, *self.test], 0)
        n = len(self.target_dev)
        dev = {ENGLISH: per_task[self.tasks[0].name][metric]}
        dev |= {e.ref.language: s[metric] for e, s in zip(self.target_dev, scores[:n], strict=True)}
        test = {e.ref.language: s for e, s in zip(self.test, scores[n:], strict=True)}
        step = self.state.global_step
        # a resumed run re-evaluates from its checkpoint: later entries of the earlier attempt go
        self.selection_history = [h for h in self.selection_history if h["step"] < step]
        self.selection_history.append({"step": step, "dev": dev, "test": test})
        if self.selection_file is not None and self.args.should_save:
            write_atomic(self.selection_file, json.dumps(self.selection_history) + "\n")
