"""Resume checkpoints that are either complete or ignored.

The Hugging Face Trainer (5.x) writes `checkpoint-N` in place, file by file: the model, the
optimizer and scheduler, each rank's RNG state, DeepSpeed's shards under ZeRO, and
trainer_state.json. A kill in between (the end of a pod's grace period, an OOM kill, a lost
node) leaves a directory that is named like a checkpoint but cannot be resumed from, and under
several ranks trainer_state.json (written by rank 0) can be there before another rank's files.

So every save goes to a staging directory, `.partial-checkpoint-N/checkpoint-N`; once every
rank has written its part, the main process flushes it to disk and renames it to
`checkpoint-N` (hf_seams.SeamTrainer._save_checkpoint). A `checkpoint-N` is complete by
construction; a `.partial-*` is what a kill left and is removed when the run starts again.

The loss window: the Trainer logs the mean training loss of the steps since its last log and
keeps their sum only in memory, so a run resumed between two logs would log the mean of fewer
steps than an uninterrupted run. Each rank saves its sum beside its RNG state and the resumed
run starts from it: the logged losses equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from xstilts.trainer.rundir import fsync_path

log = logging.getLogger("xstilts.trainer")

TRAINER_STATE = "trainer_state.json"
PARTIAL_PREFIX = ".partial-"  # hidden, and no match for the Trainer's own "checkpoint-*" glob
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def staging_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is complete."""
    return Path(root) / f"{PARTIAL_PREFIX}{checkpoint_name(step)}" / checkpoint_name(step)


def newest_checkpoint(root: str | Path) -> str | None:
    """The newest complete checkpoint-N. Staged (`.partial-*`) directories never count; nor does
    a checkpoint-N without trainer_state.json (one torn by a version that wrote in place)."""
    root = Path(root)
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir()
            if (m := _CHECKPOINT.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return str(max(done)[1]) if done else None


def remove_partial_checkpoints(root: str | Path) -> list[Path]:
    """Removes what killed saves left behind (the main process, before training starts)."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = sorted(p for p in root.iterdir() if p.name.startswith(PARTIAL_PREFIX))
    for path in stale:
        log.info("removing %s: a checkpoint whose writing was interrupted", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(staged: Path, final: Path) -> None:
    """Makes the staged checkpoint `final` in one rename, after its files reached the disk (a
    rename that survived a crash must not point at data that did not)."""
    for directory, _, files in os.walk(staged):
        for name in [*files, "."]:
            fsync_path(Path(directory) / name)
    if final.exists():  # the same step saved again: the older copy is complete too, and goes
        shutil.rmtree(final)
    os.rename(staged, final)
    fsync_path(final.parent)
    staged.parent.rmdir()  # the now empty .partial-checkpoint-N


# --- the loss window ---------------------------------------------------------------------------


def _loss_window_path(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"loss_window_{rank}.json"


def save_loss_window(checkpoint: str | Path, rank: int, world_size: int, loss_sum: float, since_step: int) -> None:
    _loss_window_path(checkpoint, rank).write_text(json.dumps(
        {"loss_sum": loss_sum, "since_step": since_step, "world_size": world_size}))


def load_loss_window(checkpoint: str | Path, rank: int, world_size: int) -> tuple[float, int] | None:
    """(sum of the losses since the last log, the step of that log), or None when the checkpoint
    has none for this rank or was written by another number of ranks (the resumed run then logs
    the mean of the steps since it started)."""
    try:
        saved = json.loads(_loss_window_path(checkpoint, rank).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("world_size") != world_size:
        return None
    return float(saved["loss_sum"]), int(saved["since_step"])
