"""plan: ExperimentSpec → the DAG of runs (pure).

Phase 2 (intermediate) runs: one per (model, intermediate task or group, seed).
Phase 3 (target) runs: one per (model, baseline-or-intermediate, target, seed); each one that
is not a baseline depends on the phase-2 run of the same model, intermediate and seed, whose
checkpoint it starts from. Every phase-2 checkpoint is trained once and shared by all targets.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from xstilts.operator.experiment.spec import BASELINE, STAGE_DEFAULTS, ExperimentSpec, ModelSpec
from xstilts.trainer.config import (
    DeepSpeedSettings,
    HyperParameters,
    MlmSettings,
    Resources,
    RunConfig,
    RunLabels,
    Stage,
    TrackingConfig,
)
from xstilts.trainer.tasks import TASKS, Format

DEFAULT_STORAGE = "xstilts-out"
# Evaluation costs 2·N FLOPs per token (forward only); ~5k dev+test examples per language.
EVAL_EXAMPLES_PER_LANGUAGE = 5000


@dataclass(frozen=True)
class PlannedRun:
    run_id: str
    config: RunConfig
    depends_on: tuple[str, ...]
    train_tokens: int
    gpu_hours: float | None  # None when the model's parameter count is unknown

    @property
    def labels(self) -> RunLabels:
        assert self.config.labels is not None
        return self.config.labels


@dataclass(frozen=True)
class Plan:
    experiment: str
    runs: tuple[PlannedRun, ...]  # dependencies before dependants
    by_id: dict[str, PlannedRun] = field(repr=False, compare=False)
    # Under spec.replication: the runs of the seeds above minSeeds, which reconcile adds to
    # `runs` cell by cell while a cell's gain interval is too wide (replication.replicated).
    reserve: tuple[PlannedRun, ...] = ()
    # Under a phase-2 learning-rate search: the target runs of every intermediate arm, from each
    # candidate phase-2 run; reconcile (search.selected) moves those that start from the
    # candidate selected on English dev into `runs`, once every candidate has its result.
    held: tuple[PlannedRun, ...] = ()

    @property
    def later(self) -> tuple[PlannedRun, ...]:
        """The runs reconcile may still add: the replication reserve and the held search runs."""
        return (*self.reserve, *self.held)

    @property
    def gpu_hours(self) -> float:
        return sum(r.gpu_hours or 0.0 for r in self.runs)

    def count(self, stage: Stage) -> int:
        return sum(1 for r in self.runs if r.config.stage is stage)

    def dependants(self, run_id: str) -> list[PlannedRun]:
        return [r for r in self.runs if run_id in r.depends_on]


def default_storage_root(spec: ExperimentSpec) -> str:
    return f"{DEFAULT_STORAGE}/{spec.name}"


@contextmanager
def gc_paused() -> Iterator[None]:
    """Builds tens of thousands of objects without the cyclic garbage collector.

    Planning and rendering make no reference cycles, but every few hundred new dicts or
    models the collector runs, and the full collections walk every live object (the plan,
    what was rendered so far): at 10,000 runs that took more time than the work itself.
    Reference counting still frees everything; the collector is restored as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def plan(spec: ExperimentSpec, storage_root: str | None = None) -> Plan:
    with gc_paused():
        return _plan(spec, storage_root)


def _plan(spec: ExperimentSpec, storage_root: str | None) -> Plan:
    root = storage_root or default_storage_root(spec)
    tracking = TrackingConfig(
        tracking_uri=spec.mlflow.tracking_uri,
        experiment_name=spec.mlflow.experiment_name or spec.name,
    )
    runs: list[PlannedRun] = []
    held: list[PlannedRun] = []
    # A stage's search: one run per value, in place of the one run with the stage's own value.
    intermediate_lrs = spec.hyperparameters.intermediate.learning_rates
    target_lrs = spec.hyperparameters.target.learning_rates
    for model in spec.models:
        shared = _ModelShared.of(spec, model)
        for seed in spec.all_seeds:
            phase2: dict[str, list[str | None]] = {BASELINE: [None]}
            for arm in spec.intermediates:
                phase2[arm] = []
                for lr in intermediate_lrs or (None,):
                    run = _intermediate_run(spec, model, shared, arm, seed, root, tracking, lr, intermediate_lrs)
                    runs.append(run)
                    phase2[arm].append(run.run_id)
            for arm in [BASELINE, *spec.intermediates]:
                # After a phase-2 search, an arm's target runs wait in `held` for its selection.
                into = held if intermediate_lrs and arm != BASELINE else runs
                for parent in phase2[arm]:
                    for target in spec.targets:
                        # Retrieval targets train nothing: a learning rate would not change their result.
                        lrs = () if TASKS[target].format is Format.RETRIEVAL else target_lrs
                        for lr in lrs or (None,):
                            into.append(_target_run(spec, model, shared, arm, parent, target, seed, root, tracking,
                                                    lr, lrs))
    by_id: dict[str, PlannedRun] = {}
    for run in (*runs, *held):
        if run.run_id in by_id:  # cannot happen unless the grid itself repeats: a bug
            raise AssertionError(f"run {run.run_id} planned twice: {run.labels} and {by_id[run.run_id].labels}")
        by_id[run.run_id] = run
    if spec.replication is None:
        return Plan(spec.name, tuple(runs), {r.run_id: r for r in runs}, held=tuple(held))
    initial = set(spec.initial_seeds)
    first = tuple(r for r in runs if r.config.seed in initial)
    return Plan(spec.name, first, {r.run_id: r for r in first}, tuple(r for r in runs if r.config.seed not in initial))


@dataclass(frozen=True)
class SearchCost:
    """What a learning-rate search costs: the runs and GPU-hours the plan will run (a phase-2
    search's target runs counted for one candidate: only the selected one's run), against the
    same grid without the search."""

    runs: int
    gpu_hours: float
    runs_without: int
    gpu_hours_without: float


def search_cost(spec: ExperimentSpec, p: Plan) -> SearchCost | None:
    """None without a search."""
    hp = spec.hyperparameters
    if hp.intermediate.search is None and hp.target.search is None:
        return None
    share = 1 / max(1, len(hp.intermediate.learning_rates))  # the held runs all candidates have alike
    without = plan(spec.model_copy(update={"hyperparameters": hp.model_copy(update={
        "intermediate": hp.intermediate.model_copy(update={"search": None}),
        "target": hp.target.model_copy(update={"search": None})})}))
    return SearchCost(len(p.runs) + round(len(p.held) * share),
                      p.gpu_hours + share * sum(r.gpu_hours or 0.0 for r in p.held),
                      len(without.runs), without.gpu_hours)


@dataclass(frozen=True)
class _ModelShared:
    """What every run of a model shares, whatever its seed: resolved once per model rather
    than once per run (the same frozen models, so the configs are equal either way)."""

    intermediate_hp: dict[str, HyperParameters]  # per intermediate task or group
    target_hp: dict[str, HyperParameters]  # per target
    deepspeed: DeepSpeedSettings
    resources: Resources

    @classmethod
    def of(cls, spec: ExperimentSpec, model: ModelSpec) -> _ModelShared:
        intermediate_hp = {}
        for arm in spec.intermediates:
            group = spec.group(arm)
            hp = resolve_hyperparameters(spec, model, "intermediate", tuple(group.tasks) if group else (arm,))
            if group and group.sampling_temperature is not None:
                hp = hp.model_copy(update={"sampling_temperature": group.sampling_temperature})
            intermediate_hp[arm] = hp
        r = model.resources
        return cls(
            intermediate_hp=intermediate_hp,
            target_hp={t: resolve_hyperparameters(spec, model, "target", (t,)) for t in spec.targets},
            deepspeed=model.deepspeed(),
            resources=Resources(gpus_per_node=r.gpus, nodes=r.nodes, processes_per_node=r.processes_per_node,
                                micro_batch_size=r.micro_batch_size),
        )


def _searched(hp: HyperParameters, lr: float | None) -> HyperParameters:
    return hp if lr is None else hp.model_copy(update={"learning_rate": lr})


def _intermediate_run(spec: ExperimentSpec, model: ModelSpec, shared: _ModelShared, arm: str, seed: int,
                      root: str, tracking: TrackingConfig, lr: float | None = None,
                      searched: tuple[float, ...] = ()) -> PlannedRun:
    group = spec.group(arm)
    tasks = tuple(group.tasks) if group else (arm,)
    config = _config(spec, model, shared, Stage.INTERMEDIATE, tasks, seed,
                     _searched(shared.intermediate_hp[arm], lr), None, (),
                     root, tracking, RunLabels(experiment=spec.name, model=model.name, intermediate=arm,
                                               model_parameters=model.parameter_count, learning_rates=searched,
                                               variant=group.variant if group else None))
    if group and group.variant:
        config = config.model_copy(update={
            "train_languages": tuple(group.translate_train or ()),
            "mlm": MlmSettings(ratio=group.mlm.ratio, corpus=group.mlm.corpus) if group.mlm else None})
    return _planned(spec, model, config, ())


def _target_run(spec: ExperimentSpec, model: ModelSpec, shared: _ModelShared, arm: str, parent: str | None,
                target: str, seed: int, root: str, tracking: TrackingConfig, lr: float | None = None,
                searched: tuple[float, ...] = ()) -> PlannedRun:
    languages = tuple(spec.eval_languages.get(target, ()))
    config = _config(spec, model, shared, Stage.TARGET, (target,), seed, _searched(shared.target_hp[target], lr),
                     parent, languages, root, tracking,
                     RunLabels(experiment=spec.name, model=model.name, intermediate=arm, target=target,
                               model_parameters=model.parameter_count, learning_rates=searched,
                               variant=_variant(spec, arm)))
    return _planned(spec, model, config, (parent,) if parent else ())


def _variant(spec: ExperimentSpec, arm: str) -> str | None:
    group = spec.group(arm)
    return group.variant if group else None


def resolve_hyperparameters(spec: ExperimentSpec, model: ModelSpec, stage: str,
                            tasks: tuple[str, ...]) -> HyperParameters:
    """Task default length < built-in stage defaults < spec stage < per model < the stage's per
    model < per task."""
    hp = HyperParameters(max_seq_length=max(TASKS[t].default_max_seq_length for t in tasks))
    stage_spec = spec.hyperparameters.intermediate if stage == "intermediate" else spec.hyperparameters.target
    layers = [STAGE_DEFAULTS[stage], stage_spec, spec.hyperparameters.per_model.get(model.name),
              stage_spec.per_model.get(model.name)]
    if len(tasks) == 1:
        layers.append(spec.hyperparameters.per_task.get(tasks[0]))
    for layer in layers:
        if layer is not None:
            hp = layer.apply(hp)
    return hp


def _config(spec: ExperimentSpec, model: ModelSpec, shared: _ModelShared, stage: Stage, tasks: tuple[str, ...],
            seed: int, hp: HyperParameters, parent: str | None, languages: tuple[str, ...], root: str,
            tracking: TrackingConfig, labels: RunLabels) -> RunConfig:
    return RunConfig(
        model=model.pretrained,
        stage=stage,
        tasks=tasks,
        seed=seed,
        hyperparameters=hp,
        init_from_run=parent,
        eval_languages=languages,
        deepspeed=shared.deepspeed,
        resources=shared.resources,
        storage_root=root,
        task_data={t: spec.data[t] for t in tasks if t in spec.data},
        tracking=tracking,
        labels=labels,
    )


def _planned(spec: ExperimentSpec, model: ModelSpec, config: RunConfig, depends_on: tuple[str, ...]) -> PlannedRun:
    tokens = train_tokens(config)
    return PlannedRun(config.run_id, config, depends_on, tokens,
                      estimate_gpu_hours(config, model.parameter_count, tokens, spec.planning.assumed_tflops_per_gpu))


def train_tokens(config: RunConfig) -> int:
    """Tokens the run will train on: examples per epoch × epochs (or steps × batch), each
    example costing the task's typical token count, capped by the maximum sequence length."""
    hp = config.hyperparameters
    total = 0.0
    copies = 1 + len(config.train_languages)  # translate-train: English and each translation
    per_epoch = {t: min(TASKS[t].train_examples, hp.max_train_examples or TASKS[t].train_examples) * copies
                 for t in config.tasks}
    examples_per_epoch = sum(per_epoch.values()) or 1
    examples = hp.max_steps * hp.batch_size if hp.max_steps else hp.epochs * examples_per_epoch
    for t, n in per_epoch.items():
        task = TASKS[t]
        # Multiple-choice counts already cover every choice; other formats are one sequence.
        tokens_each = task.tokens_per_example if task.format is Format.MULTIPLE_CHOICE else min(
            task.tokens_per_example, hp.max_seq_length)
        total += examples * (n / examples_per_epoch) * tokens_each
    if config.mlm is not None:  # MLM rows: a ratio share of the steps, max_seq_length tokens at most each
        r = config.mlm.ratio
        if hp.max_steps:  # a step budget is shared: the task gets (1 - ratio) of it
            total *= 1 - r
            mlm_examples = examples * r
        else:  # the task keeps its epochs; the MLM steps come on top
            mlm_examples = examples * r / (1 - r)
        total += mlm_examples * hp.max_seq_length
    return int(total)


def estimate_gpu_hours(config: RunConfig, parameters: int | None, tokens: int, tflops_per_gpu: float) -> float | None:
    """6·N FLOPs per training token and 2·N per evaluated token, at the assumed sustained
    FLOP rate per GPU. GPU-hours do not depend on how many GPUs share the work."""
    if parameters is None:
        return None
    flops = 6.0 * parameters * tokens
    if config.stage is Stage.TARGET:
        task = TASKS[config.tasks[0]]
        n_languages = len(config.eval_languages or task.languages)
        flops += 2.0 * parameters * n_languages * EVAL_EXAMPLES_PER_LANGUAGE * task.tokens_per_example
    return flops / (tflops_per_gpu * 1e12) / 3600.0


def iter_edges(p: Plan) -> Iterator[tuple[str, str]]:
    for run in p.runs:
        for parent in run.depends_on:
            yield parent, run.run_id
