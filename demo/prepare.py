"""Prepare the demo: the world's task files and the pretrained tiny models, each reused when
its cache key (a hash of the world and the settings that made it) has not changed.

The layout under the root (examples/demo.yaml points at it):

    data/{mnli,hellaswag}/{train,validation}.jsonl
    data/{xnli,pawsx}/en/train.jsonl, data/{xnli,pawsx}/<lang>/{validation,test}.jsonl
    models/{small,medium,large}/   config, weights and tokenizer, loadable by from_pretrained
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xstilts.demo.generate import DataSizes, write_task_data
from xstilts.demo.pretrain import (
    CACHE_FILE,
    MODEL_SIZES,
    ModelSize,
    PretrainSettings,
    prepare_models,
)
from xstilts.demo.world import World

DEFAULT_ROOT = Path("xstilts-demo")
GENERATE_VERSION = 2  # bump when the task generators change: invalidates cached data
TASKS = ("mnli", "hellaswag", "xnli", "pawsx")


@dataclass(frozen=True)
class Prepared:
    root: Path
    data: dict[str, Path]  # task -> directory
    models: dict[str, dict[str, Any]]  # size name -> pretraining record (with "dir")
    data_cached: bool
    seconds: float


def data_key(world: World, sizes: DataSizes) -> str:
    doc = {"version": GENERATE_VERSION, "world": world.fingerprint(), "sizes": asdict(sizes)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(world: World, root: Path, sizes: DataSizes = DataSizes()) -> tuple[dict[str, Path], bool]:
    """Write the task files unless the ones under `root` were made from the same world and
    sizes; return task → directory and whether they were reused."""
    key = data_key(world, sizes)
    marker = root / CACHE_FILE
    dirs = {task: root / task for task in TASKS}
    try:
        if json.loads(marker.read_text()).get("key") == key:
            return dirs, True
    except (OSError, ValueError):
        pass
    write_task_data(world, root, sizes)
    marker.write_text(json.dumps({"key": key, "sizes": asdict(sizes)}, indent=2))
    return dirs, False


def prepare(root: Path = DEFAULT_ROOT, seed: int = 0, sizes: Sequence[ModelSize] = MODEL_SIZES,
            settings: PretrainSettings = PretrainSettings(), data_sizes: DataSizes = DataSizes(),
            workers: int | None = None, log: Callable[[str], None] = lambda _: None) -> Prepared:
    """Generate the world's data and pretrain the models, reusing whatever is cached."""
    started = time.monotonic()
    world = World.build(seed)
    data, data_cached = prepare_data(world, root / "data", data_sizes)
    log(f"data: {'reused' if data_cached else 'written'} under {root / 'data'}")
    models = prepare_models(world, root / "models", sizes, settings, workers, log=log)
    for name, record in models.items():
        record["dir"] = str(root / "models" / name)
    return Prepared(root, data, models, data_cached, time.monotonic() - started)
