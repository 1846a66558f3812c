"""The seams where xstilts reaches into HF `Trainer` internals, in one table.

`StiltsTrainer` (loop.py) overrides private methods and reads private attributes of
`transformers.Trainer`. Transformers may change any of them in a minor release, so each is
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

import inspect
from dataclasses import dataclass

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
    # The attributes are set inside the training loop, not in __init__: look for them in the
    # class's source, where the loop assigns them.
    source = inspect.getsource(trainer_class)
    if f"self.{seam.name} =" not in source:
        return f"Trainer no longer assigns self.{seam.name}"
    return None


def check_hf_seams(trainer_class: type | None = None) -> list[str]:
    """The seams the installed transformers lacks, each as a message naming the seam (empty
    when all hold). `trainer_class` defaults to `transformers.Trainer`."""
    if trainer_class is None:
        from transformers import Trainer
        trainer_class = Trainer
    problems = (seam_problem(trainer_class, s) for s in SEAMS)
    return [f"{p} (xstilts was checked against transformers {CHECKED_AGAINST}; see trainer/hf_seams.py)"
            for p in problems if p is not None]
