"""One training run, end to end: check, load data, build the model, train with the Hugging Face
`Trainer` (DeepSpeed ZeRO when the config asks for it), keep the best checkpoint by English dev
metric, save the final model, evaluate every test language, and write result.json.

Run directory (rundir.RunDir):
    config.json      the resolved RunConfig
    progress.json    live progress (rundir.ProgressFile)
    resume/          the Trainer's checkpoint-N directories: resume state and best-model candidates
                     (removed once result.json is written); each is written under a .partial-*
                     name and renamed when complete (checkpoints.py)
    model/           the final model (model.save_model): what a phase-3 run starts from
    result.json      the RunResult, written last and only on success

Resume: a run started again finds the newest complete checkpoint-N and continues from it with
the Trainer's `resume_from_checkpoint` (model, optimizer, scheduler, RNG and data order; the
sampler's order depends only on seed and epoch, so the skipped batches are the ones trained).

SIGTERM / SIGINT (preemption, node drain, Ctrl-C): during training the ranks agree at the end of
the step in which any of them got the signal, save a checkpoint together and stop; outside
training the run stops at once. Either way `RunInterrupted` reaches __main__, which exits with
ExitCode.INTERRUPTED so that the run is retried, and the retry resumes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xstilts.trainer.batch_plan import InvalidRun, check_batch_layout
from xstilts.trainer.checkpoints import newest_checkpoint, remove_partial_checkpoints
from xstilts.trainer.config import RunConfig, RunResult, Stage
from xstilts.trainer.data import (
    ENGLISH,
    check_local_files,
    dev_splits,
    is_retrieval,
    open_split,
    target_dev_splits,
    test_splits,
    training_splits,
)
from xstilts.trainer.interrupt import Interruption, RunInterrupted
from xstilts.trainer.rundir import RunDir
from xstilts.trainer.tasks import TASKS, Format, Task

log = logging.getLogger("xstilts.trainer")

# Set to 1, a run goes on when the installed transformers lacks some of StiltsTrainer's seams
# (hf_seams.py), logging each: resume and checkpoint staging may then misbehave, so only a
# measurement on a machine whose transformers cannot be changed (benchmarks/gpu_check.py) sets it.
ALLOW_MISSING_SEAMS = "XSTILTS_ALLOW_MISSING_HF_SEAMS"
EVAL_BATCH_FACTOR = 4  # evaluation batches hold this many times the training micro batch's tokens


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


def precheck(config: RunConfig, world_size: int) -> None:
    """Everything that can be checked without the training stack: batch layout, local data
    files, the phase-2 model. Raises InvalidRun or DataError."""
    check_batch_layout(config, world_size)
    check_local_files(config)
    init_dir = config.init_model_dir
    if init_dir is not None and "://" not in init_dir and not (Path(init_dir) / "config.json").is_file():
        raise InvalidRun(f"init_from_run {config.init_from_run!r} has no final model at {init_dir};"
                         " run that intermediate run first")


# --- data --------------------------------------------------------------------------------------


@dataclass
class RunData:
    train: list[Any]  # Encoded, one per task (English)
    dev: list[Any]
    test: list[Any]  # target runs: one per evaluation language
    tasks: list[Task] = field(default_factory=list)
    target_dev: list[Any] = field(default_factory=list)  # target runs: dev sets in the other languages
    translations: list[Any] = field(default_factory=list)  # translate-train: Encoded, per task and language

    def train_parts(self, max_examples: int | None) -> list[Any]:
        """Each task's training features: its English split and its translations laid end to end,
        each capped to `max_examples` by the same draw (of parallel rows, the same examples)."""
        import datasets

        parts = []
        for english in self.train:
            seed_text = f"{english.ref.name}:{max_examples}"
            features = cap_rows(english, max_examples, seed_text)
            more = [cap_rows(t, max_examples, seed_text) for t in self.translations if t.ref.task == english.ref.task]
            if more:
                features = datasets.concatenate_datasets([features, *(m.cast(features.features) for m in more)])
            parts.append(features)
        return parts


def cap_rows(encoded: Any, max_examples: int | None, seed_text: str) -> Any:
    """Features of a random (fixed for the data, not the run's seed) subset of examples."""
    features = encoded.features
    if max_examples is None:
        return features
    example_ids = features["example_index"]
    n_examples = max(example_ids) + 1
    if n_examples <= max_examples:
        return features
    kept = set(random.Random(seed_text).sample(range(n_examples), max_examples))
    return features.select([i for i, e in enumerate(example_ids) if e in kept])


def load_run_data(config: RunConfig, tokenizer: Any, cache_dir: Path) -> RunData:
    from xstilts.trainer.features import load_encoded, tokenizer_fingerprint

    tokenizer_id = tokenizer_fingerprint(tokenizer)
    max_length = config.hyperparameters.max_seq_length

    def encoded(ref: Any, train_labels: Sequence[str] | None = None) -> Any:
        return load_encoded(open_split(config, ref), tokenizer, tokenizer_id, max_length, cache_dir, train_labels)

    refs = training_splits(config)
    train = [encoded(ref) for ref in refs if ref.language == ENGLISH]
    labels = {e.ref.task: e.labels for e in train}
    translations = [encoded(ref, labels[ref.task]) for ref in refs if ref.language != ENGLISH]
    dev = [encoded(ref, labels[ref.task]) for ref in dev_splits(config)]
    test = [encoded(ref, labels[ref.task]) for ref in test_splits(config)]
    target_dev = [encoded(ref, labels[ref.task]) for ref in target_dev_splits(config)]
    return RunData(train, dev, test, [TASKS[t] for t in config.tasks], target_dev, translations)


def row_tokens(train: Sequence[Any], max_length: int) -> int:
    """Tokens of the widest row: max length × the most choices of a multiple-choice task."""
    widest = 1
    for e in train:
        if e.task.format is Format.MULTIPLE_CHOICE:
            widest = max(widest, len(e.features[0]["input_ids"]))
    return widest * max_length


def micro_batch_inputs(config: RunConfig, dist: Distributed | None = None) -> dict[str, Any]:
    """What the automatic micro batch needs on a GPU: its memory and the encoder's parameter
    count (counted from the model's config, nothing loaded). Nothing on a CPU, or when the
    config fixes resources.micro_batch_size."""
    import torch

    if config.resources.micro_batch_size is not None or not torch.cuda.is_available():
        return {}
    from xstilts.trainer.batch_plan import mixed_precision
    from xstilts.trainer.model import parameter_count_of

    local_rank = dist.local_rank if dist else 0
    memory = torch.cuda.get_device_properties(local_rank).total_memory / 2**30
    return {"gpu_memory_gb": memory, "parameters": parameter_count_of(config.init_model_dir or config.model),
            "precision": mixed_precision(config, True, torch.cuda.is_bf16_supported())}


@dataclass(frozen=True)
class Batching:
    """The padding optimisations of training batches, on by default. Off, a run trains on the
    same rows with random batches padded to max_seq_length: the classic setting that
    tests/trainer/test_performance_quality.py compares against, to show that the speed costs nothing
    in accuracy."""

    length_grouping: bool = True  # batches of rows of similar length (else random rows)
    dynamic_padding: bool = True  # each batch padded to its own longest row (else to max_seq_length)

    @property
    def megabatch_factor(self) -> int:
        from xstilts.trainer.batching import MEGABATCH_FACTOR

        return MEGABATCH_FACTOR if self.length_grouping else 1  # sorting within one batch groups nothing

    def pad_to_multiple_of(self, max_seq_length: int, cuda: bool) -> int:
        if not self.dynamic_padding:
            return max_seq_length
        return 8 if cuda else 1  # tensor cores want widths in multiples of 8


# --- the run -----------------------------------------------------------------------------------


def run(config: RunConfig, interruption: Interruption | None = None, cache_dir: Path | None = None,
        batching: Batching | None = None) -> RunResult:
    """Train and evaluate one run; returns its RunResult (written to result.json by rank 0).
    Raises InvalidRun / DataError for a run that cannot succeed, RunInterrupted on a signal.
    `batching` switches the padding optimisations off (tests compare results with and without)."""
    from xstilts.trainer.features import default_cache_dir
    from xstilts.trainer.rundir import write_config

    started = time.monotonic()
    interruption = interruption or Interruption()
    dist = Distributed.from_env()
    precheck(config, dist.world_size)

    import torch
    from xstilts.trainer.batch_plan import check_runtime

    cuda = torch.cuda.is_available()
    check_runtime(config, cuda, _deepspeed_available())
    if dist.is_main:
        write_config(config)
    tracker = _tracker(config, dist.is_main)
    tracker.start()
    try:
        if is_retrieval(config):  # BUCC, Tatoeba: evaluate the encoder, train nothing
            from xstilts.trainer.retrieval import run_retrieval

            result = run_retrieval(config, tracker, started, dist.is_main)
        else:
            result = _train_and_evaluate(config, dist, interruption, cache_dir or default_cache_dir(), tracker,
                                         started, batching or Batching())
    except RunInterrupted:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    return result


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


class _NoTracker:
    """Stands in when MLflow tracking cannot be imported (a trainer without mlflow installed)."""

    mlflow_run_id = None

    def start(self) -> None:
        return None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def _tracker(config: RunConfig, enabled: bool) -> Any:
    import importlib.util

    # Without MLflow installed the run is tracking-free: buffering records would be pointless
    # (nothing here can replay them), and result.json holds every figure; `xstilts sync`
    # elsewhere rebuilds the MLflow run from it.
    if importlib.util.find_spec("mlflow") is None:
        log.warning("MLflow tracking is off: mlflow is not installed (result.json holds the run's figures)")
        return _NoTracker()
    try:
        from xstilts.trainer.tracking.tracker import RunTracker
    except ImportError as e:
        log.warning("MLflow tracking is off: %s", e)
        return _NoTracker()
    return RunTracker(config, enabled=enabled)


def _train_and_evaluate(config: RunConfig, dist: Distributed, interruption: Interruption, cache_dir: Path,
                        tracker: Any, started: float, batching: Batching) -> RunResult:
    import torch
    from transformers import AutoTokenizer, set_seed
    from xstilts.trainer.batch_plan import deepspeed_config, mixed_precision, plan_steps
    from xstilts.trainer.batching import Collator, MultiTaskBatchSampler, TrainSet
    from xstilts.trainer.evaluate import dev_metrics, oracle_test_scores, test_metrics
    from xstilts.trainer.hf_seams import check_hf_seams
    from xstilts.trainer.loop import RunCallback, StiltsTrainer
    from xstilts.trainer.model import HeadSpec, build_model, encoder_parameter_count, save_model
    from xstilts.trainer.rundir import ProgressFile, utc_now, versions, write_result
    from xstilts.trainer.tasks import selection_metric

    missing = check_hf_seams()  # StiltsTrainer's overrides would silently not run
    if missing and os.environ.get(ALLOW_MISSING_SEAMS) != "1":
        raise InvalidRun("the installed transformers lacks Trainer internals xstilts needs: " + "; ".join(missing))
    for problem in missing:  # allowed (a throughput check on an older transformers): runs, degraded
        log.warning("degraded: %s", problem)

    hp = config.hyperparameters
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    data = load_run_data(config, tokenizer, cache_dir)
    train_parts = data.train_parts(hp.max_train_examples)
    schedule = plan_steps(config, dist.world_size, [len(p) for p in train_parts],
                             row_tokens(data.train, hp.max_seq_length), **micro_batch_inputs(config, dist))
    if config.mlm is not None:  # the corpus rows the MLM steps will draw, with room for chance
        from xstilts.trainer.features import tokenizer_fingerprint
        from xstilts.trainer.mlm import encode_corpus

        mlm_steps = math.ceil(schedule.total_steps * config.mlm.ratio * 1.5) + 1
        train_parts.append(encode_corpus(config.mlm.corpus, tokenizer, tokenizer_fingerprint(tokenizer),
                                         hp.max_seq_length, mlm_steps * hp.batch_size, cache_dir))
    cuda = torch.cuda.is_available()
    precision = mixed_precision(config, cuda, cuda and torch.cuda.is_bf16_supported())
    selection = selection_metric(data.tasks)
    run_dir = RunDir.of(config)
    args = _training_arguments(config, schedule, precision, cuda, deepspeed_config(config), selection,
                               run_dir.resume)
    # Set up the process group now: under ZeRO-3 `from_pretrained` partitions the weights as it
    # loads them (deepspeed.zero.Init), which asks deepspeed.comm for the world size.
    _ = args.device
    if config.deepspeed.zero_stage == 3:
        import deepspeed

        deepspeed.init_distributed()

    set_seed(config.seed)
    specs = [HeadSpec(e.ref.task, e.task.format, e.labels if e.task.format in (Format.CLASSIFICATION, Format.TAGGING)
                      else ()) for e in data.train]
    model = build_model(config.init_model_dir or config.model, specs, config.seed, cuda,
                        half_precision=precision in ("bf16", "fp16"), mlm=config.mlm is not None)
    parameters = encoder_parameter_count(model)
    _log_params(tracker, config, schedule, parameters, precision, dist.world_size)

    mlm: dict[str, Any] = {}
    if config.mlm is not None:  # the corpus is the last training part; its batches train the MLM head
        from xstilts.trainer.mlm import masker

        mlm = {"mlm_task_index": len(specs), "masker": masker(tokenizer, config.mlm.mask_probability),
               "special_ids": frozenset(tokenizer.all_special_ids)}
    collator = Collator(tokenizer.pad_token_id, pad_to_multiple_of=batching.pad_to_multiple_of(hp.max_seq_length, cuda),
                        **mlm)
    sampler = MultiTaskBatchSampler([p["length"][:] for p in train_parts], hp.batch_size, schedule.micro_batch_size,
                                    schedule.steps_per_epoch, hp.sampling_temperature, config.seed,
                                    megabatch_factor=batching.megabatch_factor,
                                    last_share=config.mlm.ratio if config.mlm else None)
    progress = ProgressFile(run_dir.progress, enabled=dist.is_main)
    progress.update(force=True, total_steps=schedule.total_steps, phase="train")
    callback = RunCallback(progress, tracker, interruption)
    trainer = StiltsTrainer(
        model=model, args=args, train_set=TrainSet(train_parts), sampler=sampler, collator=collator,
        dev=data.dev, tasks=data.tasks, eval_cap=hp.max_eval_examples, tracker=tracker, progress=progress,
        eval_tokens=EVAL_BATCH_FACTOR * schedule.micro_batch_size * row_tokens(data.train, hp.max_seq_length),
        callback=callback, target_dev=data.target_dev, test=data.test, selection_file=run_dir.selection,
        mlm_task_index=mlm.get("mlm_task_index"),
    )
    if dist.is_main:
        remove_partial_checkpoints(run_dir.resume)
    resume = newest_checkpoint(run_dir.resume)
    if resume:
        log.info("resuming from %s", resume)
    train_started = time.monotonic()
    with interruption.deferring():
        trainer.train(resume_from_checkpoint=resume)
    # seconds of training steps (callback.train_seconds), or the whole call when this attempt
    # trained no step (a retry that found the last checkpoint)
    train_seconds = callback.train_seconds or time.monotonic() - train_started
    train_cpu_seconds = round(callback.train_cpu_seconds, 3) if callback.train_seconds else None
    tokens_this_attempt = trainer.state.num_input_tokens_seen - callback.tokens_at_start

    state_dict = _full_state_dict(trainer)
    if dist.is_main:
        save_model(trainer.model, run_dir.model, tokenizer, state_dict)
    del state_dict

    progress.update(force=True, phase="eval")
    per_task = {e.ref.task: trainer.evaluate_split(e, i) for i, e in enumerate(data.dev)}
    metrics = dev_metrics(data.tasks, per_task)
    languages: dict[str, dict[str, float]] = {}
    if config.stage is Stage.TARGET:
        records: list[list[dict[str, Any]]] = []
        languages = dict(zip([e.ref.language for e in data.test], trainer.evaluate_splits(data.test, 0, records),
                             strict=True))
        if dist.is_main:
            write_predictions(run_dir.predictions, [e.ref.language for e in data.test], records)
        metrics |= test_metrics(config.tasks[0], languages)
    oracle = oracle_test_scores(trainer.selection_history)
    if oracle:
        oracle_metrics = test_metrics(config.tasks[0], oracle)
        metrics |= {k.replace(".test.", ".test_oracle.", 1): v for k, v in oracle_metrics.items()}
    result = RunResult(
        run_id=config.run_id, config=config, metrics=metrics, languages=languages, primary_metric=selection,
        oracle_languages=oracle,
        parameter_count=parameters, tokens_seen=int(trainer.state.num_input_tokens_seen),
        train_steps=int(trainer.state.global_step), wall_seconds=round(time.monotonic() - started, 2),
        tokens_per_second=round(tokens_this_attempt / max(train_seconds, 1e-9), 1),
        train_cpu_seconds=train_cpu_seconds, finished_at=utc_now(),
        mlflow_run_id=tracker.mlflow_run_id, versions=versions(),
    )
    if dist.is_main:
        tracker.log_metrics(metrics | {"tokens_seen": float(result.tokens_seen),
                                       "tokens_per_second": result.tokens_per_second},
                            step=result.train_steps)
        path = write_result(result)
        tracker.log_artifact(path)
        tracker.log_artifact(run_dir.config)
        if run_dir.predictions.is_file():
            tracker.log_artifact(run_dir.predictions)
        progress.update(force=True, phase="eval", step=result.train_steps, eta_s=0.0)
        # The run is done and never resumes: its resume checkpoints (weights, optimizer state) go.
        shutil.rmtree(run_dir.resume, ignore_errors=True)
    return result


def write_predictions(path: Path, languages: Sequence[str], records: Sequence[Sequence[dict[str, Any]]]) -> None:
    """The per-example test outcomes (evaluate.outcomes) of every language as one Parquet
    file, written to a temporary name and renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"language": lang, **r} for lang, split in zip(languages, records, strict=True) for r in split]
    schema = pa.schema([("language", pa.string()), ("example", pa.int64()), ("prediction", pa.string()),
                        ("gold", pa.string()), ("score", pa.float64()), ("weight", pa.float64())])
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd")
    os.replace(tmp, path)


def _log_params(tracker: Any, config: RunConfig, schedule: Any, parameters: int, precision: str,
                world_size: int) -> None:
    """The run's params (the RunConfig flattened, parameter count, resolved precision, steps).
    How the batch was laid out over processes is a tag, not a param: MLflow params cannot
    change, and a resumed run may get another number of GPUs."""
    params: dict[str, Any] = {"parameter_count": parameters, "precision_resolved": precision,
                              "total_steps": schedule.total_steps}
    with contextlib.suppress(ImportError):
        from xstilts.trainer.tracking.tracker import config_params

        params = config_params(config) | params
    tracker.log_params(params)
    tracker.set_tags({"xstilts.world_size": world_size, "xstilts.micro_batch_size": schedule.micro_batch_size,
                      "xstilts.gradient_accumulation_steps": schedule.accumulation})


def _training_arguments(config: RunConfig, schedule: Any, precision: str, cuda: bool, ds: dict[str, Any] | None,
                        selection: str, output_dir: Path) -> Any:
    from transformers import TrainingArguments

    hp = config.hyperparameters
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=schedule.micro_batch_size,
        per_device_eval_batch_size=schedule.micro_batch_size,
        gradient_accumulation_steps=schedule.accumulation,
        learning_rate=hp.learning_rate, weight_decay=hp.weight_decay,
        lr_scheduler_type="linear", warmup_steps=hp.warmup_ratio,  # a float below 1 is a ratio
        max_steps=schedule.total_steps,
        eval_strategy="steps", eval_steps=schedule.eval_steps,
        save_strategy="steps", save_steps=schedule.eval_steps, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model=f"eval_{selection}", greater_is_better=True,
        logging_strategy="steps", logging_steps=schedule.logging_steps, report_to="none", disable_tqdm=True,
        seed=config.seed, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not cuda,
        optim="adamw_torch_fused",  # one fused kernel for all parameters, on GPU and CPU alike
        deepspeed=ds, remove_unused_columns=False,
        label_names=["labels", "start_positions", "end_positions"],
        include_num_input_tokens_seen="non_padding",
        # one head per task: the heads of the other tasks get no gradient in a step
        ddp_find_unused_parameters=len(config.tasks) > 1 or config.mlm is not None,
        dataloader_pin_memory=cuda, dataloader_num_workers=2 if cuda else 0,
    )


def _full_state_dict(trainer: Any) -> dict[str, Any] | None:
    """The whole model's state on rank 0; under ZeRO-3 gathered from the shards (every rank
    must take part)."""
    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # None on ranks other than 0
        return dict(state) if state is not None else None
    return None
