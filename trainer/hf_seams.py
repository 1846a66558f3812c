"""The seams where xstilts reaches into HF `Trainer` internals, in one module.

`SeamTrainer` below is the only code that overrides private methods or touches private
attributes of `transformers.Trainer`; `StiltsTrainer` (loop.py) builds on it and uses the
Trainer's public API only. Transformers may change any of these in a minor release, so each is
listed here and checked: `check_hf_seams()` at trainer start (it returns the seams the
installed transformers lacks, so a caller can fail or degrade and record it), and one test per
seam in tests/trainer/test_hf_seams.py.

Checked against transformers 5.24.0:

| seam                      | kind      | why xstilts needs it                                          |
|---------------------------|-----------|---------------------------------------------------------------|
| `_run_epoch`              | override  | set the sampler's epoch on resume (accelerate's wrappers hide |
|                           |           | it), else a resumed epoch replays epoch 0's batches           |
| `_get_output_dir`         | override  | aim the checkpoint save (and rotation) at a staging dir, so a |
|                           |           | checkpoint appears only once complete                         |
| `_save_checkpoint`        | override  | stage, save the loss window, publish by rename, rotate        |
| `_load_rng_state`         | override  | the one call on resume before the first step: restore the     |
|                           |           | loss window saved with the checkpoint                         |
| `_tr_loss`                | attribute | the loss since the last log: saved and restored so a resumed  |
|                           |           | run logs the same loss as an uninterrupted one                |
| `_globalstep_last_logged` | attribute | the step of the last log, saved and restored with `_tr_loss`  |
"""

from __future__ import annotations

import contextlib
import dis
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer
from transformers.trainer_utils import rotate_checkpoints
from xstilts.trainer import checkpoints

if TYPE_CHECKING:
    from xstilts.trainer.batching import MultiTaskBatchSampler

CHECKED_AGAINST = "5.24.0"


@dataclass(frozen=True)
class Seam:
    name: str
    kind: str  # "override" | "attribute"
    # for an override: the parameters our override passes on (by name) to the Trainer's method
    parameters: tuple[str, ...] = ()


SEAMS: tuple[Seam, ...] = (
    Seam("_run_epoch", "override", ("epoch",)),
    Seam("_get_output_dir", "override", ("trial",)),
    Seam("_save_checkpoint", "override", ("model", "trial")),
    Seam("_load_rng_state", "override", ("checkpoint",)),
    Seam("_tr_loss", "attribute"),
    Seam("_globalstep_last_logged", "attribute"),
)


def seam_problem(trainer_class: type, seam: Seam) -> str | None:
    """Why `seam` does not hold on `trainer_class`, or None when it does."""
    if seam.kind == "override":
        method = getattr(trainer_class, seam.name, None)
        if not callable(method):
            return f"Trainer.{seam.name} no longer exists"
        params = inspect.signature(method).parameters
        missing = [p for p in seam.parameters if p not in params]
        if missing:
            return f"Trainer.{seam.name} no longer takes {', '.join(missing)} (signature {inspect.signature(method)})"
        return None
    # The attributes are set inside the training loop, not in __init__: look for the loop's
    # assignment in the bytecode of the class's methods. (Reading the class's source with
    # inspect.getsource costs about a second per run; the bytecode takes milliseconds.)
    if not assigns_attribute(trainer_class, seam.name):
        return f"Trainer no longer assigns self.{seam.name}"
    return None


def assigns_attribute(cls: type, name: str) -> bool:
    """Whether a method of `cls` or of its bases stores the attribute `name` (`x.name = ...`)."""
    codes = [f.__code__ for klass in cls.__mro__ for f in vars(klass).values() if inspect.isfunction(f)]
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if inspect.iscode(c))  # nested functions, comprehensions
        # co_names holds every attribute the code touches: disassemble only the few that touch it
        if name in code.co_names and any(i.opname == "STORE_ATTR" and i.argval == name
                                         for i in dis.get_instructions(code)):
            return True
    return False


def check_hf_seams(trainer_class: type | None = None) -> list[str]:
    """The seams the installed transformers lacks, each as a message naming the seam (empty
    when all hold). `trainer_class` defaults to `transformers.Trainer`."""
    if trainer_class is None:
        trainer_class = Trainer
    problems = (seam_problem(trainer_class, s) for s in SEAMS)
    return [f"{p} (xstilts was checked against transformers {CHECKED_AGAINST}; see trainer/hf_seams.py)"
            for p in problems if p is not None]


class SeamTrainer(Trainer):
    """`transformers.Trainer` with the overrides of its internals listed in SEAMS, and nothing
    else. A subclass sets `batch_sampler` (the sampler behind the training data loader) and
    may replace `checkpoint_pause` (the time a save takes is not training time)."""

    batch_sampler: MultiTaskBatchSampler
    # the Trainer's private attributes in SEAMS, as the training loop sets them
    _tr_loss: torch.Tensor
    _globalstep_last_logged: int
    # while a checkpoint is saved: the staging dir the Trainer writes it under
    _staging: Path | None = None

    def checkpoint_pause(self) -> contextlib.AbstractContextManager[None]:
        """Wraps each checkpoint save."""
        return contextlib.nullcontext()

    def _run_epoch(self, *args: Any, epoch: int, **kwargs: Any) -> Any:
        # On a resume on several ranks accelerate wraps the sampler twice (a shard, then the
        # skip of the batches already trained) and its set_epoch reaches neither: the resumed
        # epoch would replay epoch 0's batches.
        self.batch_sampler.set_epoch(epoch)
        return super()._run_epoch(*args, epoch=epoch, **kwargs)

    # --- checkpoints: staged, then renamed into place once complete (see checkpoints.py) -------

    def _get_output_dir(self, trial: Any) -> str:
        # while a checkpoint is saved the Trainer writes it (and rotates) under the staging dir
        return str(self._staging.parent) if self._staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        root, step = Path(self.args.output_dir), self.state.global_step
        staged, final = checkpoints.staging_dir(root, step), root / checkpoints.checkpoint_name(step)
        with self.checkpoint_pause():
            self._staging = staged
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            checkpoints.save_loss_window(staged, self.args.process_index, self.args.world_size,
                                         float(self._tr_loss.item()), self._globalstep_last_logged)
            # The Trainer looked for the best checkpoint under the staging dir; it lives in root.
            best = self.state.best_global_step
            if best and (best == step or (root / checkpoints.checkpoint_name(best)).is_dir()):
                self.state.best_model_checkpoint = str(root / checkpoints.checkpoint_name(best))
            self.accelerator.wait_for_everyone()  # every rank's files (and DeepSpeed shards) are written
            if self.args.should_save:
                self.state.save_to_json(str(staged / checkpoints.TRAINER_STATE))  # with the final path
                checkpoints.publish(staged, final)
                rotate_checkpoints(str(root), self.args.save_total_limit, self.state.best_model_checkpoint,
                                   use_mtime=True)
            self.accelerator.wait_for_everyone()  # no rank goes on before the checkpoint is in place

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called once on resume, just before the first step: the place to restore the loss window.
        super()._load_rng_state(checkpoint)
        window = checkpoints.load_loss_window(checkpoint, self.args.process_index,
                                              self.args.world_size) if checkpoint else None
        if window is not None:
            self._tr_loss = torch.tensor(window[0], device=self._tr_loss.device)
            self._globalstep_last_logged = window[1]
