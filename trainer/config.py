"""RunConfig: the whole contract between the operator (which plans runs) and the trainer
(which executes one). Also the record a finished run leaves behind (RunResult) and the exit
codes the cluster layer acts on.

This module must not import torch: the controller image imports it to plan and render runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from enum import IntEnum, StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from xstilts.trainer.rundir import RunDir, run_dir

RUN_ID_LENGTH = 12


class ExitCode(IntEnum):
    """The project's exit codes, the trainer's and the command line's. The Job's
    podFailurePolicy maps INVALID to FailJob (never retry); INTERRUPTED (SIGTERM: preemption,
    node drain) is retried and resumes from a checkpoint."""

    OK = 0
    FAILED = 1  # CLI: a run failed, a cluster call failed, MLflow still unreachable; launcher: a worker failed
    INVALID_INPUT = 2  # CLI: bad spec, bad option: nothing was done
    INVALID = 42  # trainer: the run's config or data cannot succeed; never retried
    INTERRUPTED = 75  # EX_TEMPFAIL


def first_error(error: ValidationError) -> str:
    """The first problem of a pydantic ValidationError on one line, `field.path: message`,
    saying how many more there are (the one formatter of the trainer,
    the result readers and the CLI)."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


class Stage(StrEnum):
    INTERMEDIATE = "intermediate"
    TARGET = "target"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HyperParameters(_Frozen):
    """Optimisation settings of one run. `batch_size` is the global batch: examples per
    optimizer step summed over all processes and accumulation steps, so that a result does
    not depend on how many GPUs computed it."""

    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-5
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    epochs: Annotated[float, Field(gt=0, le=1000)] = 3.0
    max_steps: Annotated[int | None, Field(ge=1)] = None  # overrides epochs when set
    max_seq_length: Annotated[int, Field(ge=8, le=8192)] = 128
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.1
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.01
    max_train_examples: Annotated[int | None, Field(ge=1)] = None  # cap on the training set
    max_eval_examples: Annotated[int | None, Field(ge=1)] = None  # cap per evaluation split
    # Multi-task runs draw each batch's task with probability ∝ n_task^(1/T):
    # T=1 is proportional sampling, large T tends to uniform.
    sampling_temperature: Annotated[float, Field(ge=1, le=100)] = 1.0
    # Retrieval targets (BUCC, Tatoeba): the encoder layer whose mean-pooled states embed a
    # sentence (0: the embeddings). None: XTREME's depth share, layer 14 of 24 (retrieval.py).
    retrieval_layer: Annotated[int | None, Field(ge=0, le=1000)] = None


UNSET_NOT_IN_IDENTITY = ("retrieval_layer",)
# RunConfig fields added later: left out of RUN.json and the run identity while unset, so that the
# runs planned before them keep their ids and renders.
UNSET_NOT_IN_RUN = ("train_languages", "mlm")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})?")

OffloadMode = Literal["none", "optimizer", "all"]


class DeepSpeedSettings(_Frozen):
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    offload: OffloadMode = "none"

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedSettings:
        if self.offload == "optimizer" and self.zero_stage < 1:
            raise ValueError(
                "offload 'optimizer' needs zero_stage 1, 2 or 3 (ZeRO-0 keeps the optimizer on the"
                " GPU); raise zero_stage or set offload 'none'"
            )
        if self.offload == "all" and self.zero_stage != 3:
            raise ValueError(
                "offload 'all' (parameters and optimizer) needs zero_stage 3; set zero_stage 3"
                " or offload 'optimizer'"
            )
        return self


class Resources(_Frozen):
    """Where one run executes. `processes_per_node` defaults to the GPU count (one process per
    GPU), or 1 on CPU; on CPU it may be raised to exercise DeepSpeed with several ranks."""

    gpus_per_node: Annotated[int, Field(ge=0, le=16)] = 0
    nodes: Annotated[int, Field(ge=1, le=512)] = 1
    processes_per_node: Annotated[int | None, Field(ge=1, le=64)] = None
    micro_batch_size: Annotated[int | None, Field(ge=1, le=4096)] = None  # None: derived

    @model_validator(mode="after")
    def _multi_node_needs_gpus(self) -> Resources:
        if self.nodes > 1 and self.gpus_per_node == 0:
            raise ValueError("nodes > 1 needs gpus_per_node >= 1: multi-node CPU runs are not supported")
        if self.gpus_per_node and self.processes_per_node not in (None, self.gpus_per_node):
            raise ValueError(
                f"processes_per_node must equal gpus_per_node ({self.gpus_per_node}) on GPU nodes:"
                " one process drives one GPU"
            )
        return self

    @property
    def procs_per_node(self) -> int:
        return self.processes_per_node or max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        return self.procs_per_node * self.nodes


class TrackingConfig(_Frozen):
    """MLflow target. No URI means a local store beside the run's results."""

    tracking_uri: str | None = None
    experiment_name: str = "xstilts"
    parent_run_id: str | None = None  # the experiment's MLflow parent run, when known


class MlmSettings(_Frozen):
    """Continued masked-language modelling mixed into an intermediate run: a `ratio` share of the
    optimiser steps trains the MLM objective on the `corpus` text (trainer/mlm.py)."""

    ratio: Annotated[float, Field(gt=0, lt=1)]
    corpus: Annotated[str, Field(min_length=1)]  # a .txt / .jsonl file or a directory of them
    mask_probability: Annotated[float, Field(gt=0, lt=1)] = 0.15  # BERT's and XLM-R's

    @field_validator("corpus")
    @classmethod
    def _plain_corpus(cls, corpus: str) -> str:
        return _plain_path("mlm.corpus", corpus)


class RunLabels(_Frozen):
    """Where this run sits in the experiment grid; names for humans, reports and labels.
    Not part of the run's identity."""

    experiment: str
    model: str
    intermediate: str  # a task name, a multi-task group name, or "baseline"
    target: str | None = None  # None for an intermediate run
    model_parameters: int | None = None
    # The learning rates searched at this run's stage (its own is hyperparameters.learning_rate).
    # Empty without a search.
    learning_rates: tuple[float, ...] = ()
    # The arm's variant ("mlm", "translate-train"), on its intermediate and its target runs; None
    # for a plain arm.
    variant: str | None = None

    @model_serializer(mode="wrap")
    def _without_empty_search(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Left out while empty: RUN.json and the MLflow params of runs without a search or a
        # variant stay as they were.
        data: dict[str, Any] = handler(self)
        if not data.get("learning_rates"):
            data.pop("learning_rates", None)
        if data.get("variant") is None:
            data.pop("variant", None)
        return data


ModelSource = Annotated[str, Field(min_length=1, max_length=512)]
RUN_ID = re.compile(rf"[0-9a-f]{{{RUN_ID_LENGTH}}}")
# Characters that no path or hub id of a run may hold: the OS rejects NUL in a path only when
# the path is first used (a crash mid-run instead of an invalid config), and line breaks would
# forge lines in logs.
CONTROL_CHARACTERS = frozenset(map(chr, [*range(32), 127]))


def _plain_path(what: str, value: str) -> str:
    """`value` unchanged, or ValueError if it holds control characters or a '..' segment."""
    if CONTROL_CHARACTERS & set(value):
        raise ValueError(f"{what} {value!r} contains control characters; give a plain path")
    if ".." in PurePosixPath(value.split("://", 1)[-1]).parts:
        raise ValueError(f"{what} {value!r} contains '..'; give a path without '..'")
    return value


class RunConfig(_Frozen):
    """Everything one training run needs. Serialised to RUN.json for
    `python -m xstilts.trainer RUN.json`."""

    model: ModelSource  # hub id ("FacebookAI/xlm-roberta-large") or a local directory
    stage: Stage
    tasks: Annotated[tuple[str, ...], Field(min_length=1)]
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    hyperparameters: HyperParameters = HyperParameters()
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # Phase 3 starts from its phase-2 run's final model; None starts from `model`. A run id,
    # never a path: the model it names is always inside this storage root.
    init_from_run: str | None = None
    eval_languages: tuple[str, ...] = ()  # empty: every language the target task has
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    resources: Resources = Resources()
    storage_root: Annotated[str, Field(min_length=1)] = "xstilts-out"
    task_data: dict[str, str] = Field(default_factory=dict)  # task -> local data directory
    tracking: TrackingConfig = TrackingConfig()
    labels: RunLabels | None = None
    # Translate-train: languages besides English whose translation of each task's training data
    # (task_data/<language>/train.jsonl) is trained on too. Intermediate runs only.
    train_languages: tuple[str, ...] = ()
    # Continued multilingual MLM mixed into an intermediate run's steps.
    mlm: MlmSettings | None = None

    @model_serializer(mode="wrap")
    def _without_unset_additions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in UNSET_NOT_IN_RUN:
            if not data.get(name):
                data.pop(name, None)
        return data

    @field_validator("train_languages")
    @classmethod
    def _languages(cls, languages: tuple[str, ...]) -> tuple[str, ...]:
        for lang in languages:
            if not LANGUAGE_CODE.fullmatch(lang) or lang == "en":
                raise ValueError(f"train_languages: {lang!r} is not a language code other than 'en' (e.g. 'de',"
                                 " 'pt-BR'); English is always trained on")
        if len(set(languages)) != len(languages):
            raise ValueError(f"train_languages {list(languages)} repeat a language; list each once")
        return languages

    @field_validator("tasks")
    @classmethod
    def _known_distinct_tasks(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        from xstilts.trainer.tasks import TASKS, unknown_task_message

        for name in tasks:
            if name not in TASKS:
                raise ValueError(unknown_task_message(name))
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks {list(tasks)} repeat a task; list each task once")
        return tasks

    @field_validator("storage_root")
    @classmethod
    def _no_traversal(cls, root: str) -> str:
        return _plain_path("storage_root", root)

    @field_validator("init_from_run")
    @classmethod
    def _a_run_id(cls, run_id: str | None) -> str | None:
        if run_id is not None and not RUN_ID.fullmatch(run_id):
            raise ValueError(f"init_from_run {run_id!r} is not a run id ({RUN_ID_LENGTH} hex digits, as `xstilts plan`"
                             " lists them)")
        return run_id

    @field_validator("model")
    @classmethod
    def _plain_model(cls, model: str) -> str:
        return _plain_path("model", model)

    @field_validator("task_data")
    @classmethod
    def _plain_data_paths(cls, task_data: dict[str, str]) -> dict[str, str]:
        for task, path in task_data.items():
            if not path:
                raise ValueError(f"task_data[{task!r}] is empty; give the task's data directory")
            _plain_path(f"task_data[{task!r}]", path)
        return task_data

    @model_validator(mode="after")
    def _stage_rules(self) -> RunConfig:
        from xstilts.trainer.tasks import TASKS

        if self.stage is Stage.TARGET:
            if len(self.tasks) != 1:
                raise ValueError("a target run trains exactly one task; multi-task is for intermediate runs")
            task = TASKS[self.tasks[0]]
            if not task.is_target:
                raise ValueError(
                    f"task {task.name!r} is not a target task; targets are:"
                    f" {', '.join(sorted(n for n, t in TASKS.items() if t.is_target))}"
                )
            bad = [lang for lang in self.eval_languages if lang not in task.languages]
            if bad:
                raise ValueError(
                    f"eval_languages {bad} are not languages of {task.name}; it has"
                    f" {', '.join(task.languages)}"
                )
            if self.train_languages or self.mlm is not None:
                raise ValueError("train_languages and mlm are for intermediate runs only")
        else:
            missing = [t for t in self.tasks if t not in self.task_data]
            if self.train_languages and missing:
                raise ValueError(f"train_languages {list(self.train_languages)} need task_data for {missing}: the"
                                 " translations are read from <task_data>/<language>/train.jsonl")
            if self.init_from_run is not None:
                raise ValueError("an intermediate run starts from the pretrained model: drop init_from_run")
            if self.eval_languages:
                raise ValueError("eval_languages is for target runs only")
        for name in self.task_data:
            if name not in self.tasks:
                raise ValueError(f"task_data names {name!r}, which is not one of this run's tasks {list(self.tasks)}")
        return self

    # --- identity -------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The fields that determine the run's result. Output locations, resources, tracking
        and labels are left out: the same run requested twice, anywhere, has the same id."""
        identity = self.model_dump(
            mode="json",
            include={"model", "stage", "tasks", "seed", "hyperparameters", "precision",
                     "init_from_run", "eval_languages", *UNSET_NOT_IN_RUN},
        )
        # Settings added later count only when set, so that the runs planned before keep their ids.
        for name in UNSET_NOT_IN_IDENTITY:
            if identity["hyperparameters"].get(name) is None:
                identity["hyperparameters"].pop(name, None)
        return identity

    @property
    def run_id(self) -> str:
        return run_id_of(self.identity())

    # --- locations ------------------------------------------------------------------------

    @property
    def run_dir(self) -> str:
        return run_dir(self.storage_root, self.run_id)

    @property
    def init_model_dir(self) -> str | None:
        """The final model of the phase-2 run this run starts from (a string: the storage root
        may be a URI); the run directory's other paths are `rundir.RunDir.of(config)`'s."""
        if self.init_from_run is None:
            return None
        return f"{run_dir(self.storage_root, self.init_from_run)}/{RunDir.MODEL}"

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def run_id_of(identity: dict[str, Any]) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:RUN_ID_LENGTH]


# --- ZeRO stage from memory ----------------------------------------------------------------

# Mixed-precision Adam holds 16 bytes per parameter: bf16 weights (2) and gradients (2), fp32
# master weights (4) and two fp32 moments (8). ZeRO partitions the optimizer state (stage 1),
# then gradients (2), then weights (3) across the data-parallel ranks.
BYTES_PER_PARAMETER = 16
# Share of GPU memory that model states may take; the rest is for activations and buffers.
MODEL_STATE_SHARE = 0.6


def model_state_bytes_per_gpu(parameters: int, world_size: int, zero_stage: int,
                              offload: OffloadMode = "none") -> float:
    n, g = float(parameters), float(world_size)
    if offload == "all":
        return 0.0 + 2 * n / g  # only the gathered working copy of one layer and bf16 grads
    if offload == "optimizer":
        weights = 2 * n / g if zero_stage == 3 else 2 * n
        grads = 2 * n / g if zero_stage >= 2 else 2 * n
        return weights + grads
    if zero_stage == 0:
        return 16 * n
    if zero_stage == 1:
        return 4 * n + 12 * n / g
    if zero_stage == 2:
        return 2 * n + 14 * n / g
    return 16 * n / g


def choose_deepspeed(parameters: int, gpu_memory_gb: float, world_size: int) -> DeepSpeedSettings:
    """The least partitioned setting whose model states fit: ZeRO-0 (plain DDP), ZeRO-2,
    ZeRO-3, then ZeRO-3 with optimizer offload, then with parameter offload too."""
    budget = gpu_memory_gb * 2**30 * MODEL_STATE_SHARE
    candidates: list[tuple[int, OffloadMode]] = [
        (0, "none"), (2, "none"), (3, "none"), (3, "optimizer"), (3, "all"),
    ]
    for stage, offload in candidates:
        if model_state_bytes_per_gpu(parameters, world_size, stage, offload) <= budget:
            return DeepSpeedSettings(zero_stage=stage, offload=offload)
    need = math.ceil(model_state_bytes_per_gpu(parameters, world_size, 3, "all") / 2**30)
    raise ValueError(
        f"{parameters:,} parameters do not fit on {world_size} GPU(s) of {gpu_memory_gb:g} GB even"
        f" with ZeRO-3 and full CPU offload (about {need} GB of model state per GPU against"
        f" {MODEL_STATE_SHARE:.0%} of memory); add GPUs or nodes"
    )


# --- micro batch from memory ---------------------------------------------------------------

# Activations a transformer layer keeps for the backward pass, per token, in bytes per unit of
# hidden size at 16-bit precision with a fused attention kernel (SDPA / flash attention keep no
# attention-score matrix): 34 (Korthikanti et al. 2022, "Reducing Activation Recomputation in
# Large Transformer Models", without the 5·heads·seq/hidden term of stored scores).
ACTIVATION_BYTES_PER_HIDDEN = 34
# Share of GPU memory that model states and activations may take together; the rest goes to
# the allocator's fragmentation, kernels' workspaces and the CUDA context.
USABLE_MEMORY_SHARE = 0.9
# layers × hidden size ≈ this × parameters^(2/3). Fitted as an upper bound on XLM-R base, large,
# XL and XXL (it overestimates them by 2.5x, 1.5x, 1.4x and 1.35x): an encoder's width and depth
# grow together, and its embeddings only make the bound looser.
DEPTH_WIDTH_PER_PARAMETER_POWER = 0.055


def activation_bytes_per_token(parameters: int, bytes_per_value: int = 2) -> float:
    """Training activations of one token through the whole encoder, estimated from its size."""
    layers_times_hidden = DEPTH_WIDTH_PER_PARAMETER_POWER * math.pow(parameters, 2 / 3)
    return ACTIVATION_BYTES_PER_HIDDEN * layers_times_hidden * bytes_per_value / 2


def choose_micro_batch(parameters: int, tokens_per_row: int, gpu_memory_gb: float, per_rank_batch: int,
                       world_size: int = 1, deepspeed: DeepSpeedSettings | None = None,
                       bytes_per_value: int = 2) -> int:
    """The largest divisor of the per-process batch whose activations fit in the GPU memory left
    beside the model states (of the ZeRO setting `deepspeed`; default: none), so that gradient
    accumulation (per_rank_batch / micro batch) is a whole number and as small as memory allows.
    `tokens_per_row` is the padded width of the widest row (max length × choices); 1 when even
    one row does not fit (the run will then fail at its first step, which is the longest)."""
    ds = deepspeed or DeepSpeedSettings()
    states = model_state_bytes_per_gpu(parameters, world_size, ds.zero_stage, ds.offload)
    budget = gpu_memory_gb * 2**30 * USABLE_MEMORY_SHARE - states
    per_row = tokens_per_row * activation_bytes_per_token(parameters, bytes_per_value)
    fits = int(budget // per_row) if budget > 0 else 0
    return max(d for d in range(1, per_rank_batch + 1) if per_rank_batch % d == 0 and (d <= fits or d == 1))


# --- the record of a finished run ----------------------------------------------------------


class RunResult(BaseModel):
    """result.json, written atomically next to the final model when a run succeeds. It is the
    record of what happened; MLflow is a view that can be rebuilt from it."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    config: RunConfig
    status: Literal["succeeded"] = "succeeded"
    # Flat metric names: "dev.accuracy", "xnli.test.accuracy.de", "xnli.test.accuracy.avg"...
    metrics: dict[str, float]
    # Per-language test metrics of a target run: {"de": {"accuracy": 0.71}, ...}
    languages: dict[str, dict[str, float]] = Field(default_factory=dict)
    # The same, by target-dev ("oracle") selection: each language's test metrics at the evaluation
    # step its own dev set scored best. Empty when the target has no dev sets in its languages.
    oracle_languages: dict[str, dict[str, float]] = Field(default_factory=dict)
    primary_metric: str = "accuracy"
    parameter_count: int
    tokens_seen: int
    train_steps: int
    wall_seconds: float
    tokens_per_second: float  # real (non-pad) tokens per second of training steps, evaluations and saves excluded
    # Process CPU seconds of the same training steps (this attempt's; None when it trained no
    # step): on a shared machine tokens per CPU second compare runs where wall rates cannot.
    train_cpu_seconds: float | None = None
    finished_at: str  # ISO 8601, UTC
    mlflow_run_id: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
