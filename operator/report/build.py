"""The scaling report, pure over result records: for every model × intermediate task ×
target × language the gain over the baseline (mean and 95% t interval over seeds), per-model
averages, the best intermediate task per model size, the trend of the gain with model size
(the slope against log10 parameters, with its interval: the answer the study asks for), and
what is still missing; rendered as Markdown and as a self-contained HTML page. Plots are in
plots.py (matplotlib), files and MLflow in storage.py.

Gains are in points of the target's metric (accuracy × 100). Two language averages: "avg" is
the mean over every evaluated language of the target, English included, as XTREME averages;
"zero-shot" leaves English out. English gains are large and in-distribution, so the
zero-shot average is the headline: the per-model averages, the best arm and the trend use it.
"""

from __future__ import annotations

import base64
import html
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from xstilts.operator.experiment.search import dev_means, english_dev, select
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec
from xstilts.operator.report.stats import (
    BOOTSTRAP_REPLICATES,
    Interval,
    Method,
    SeedSample,
    Trend,
    example_bootstrap,
    gain_interval,
    mean_interval,
    seed_sample,
    trend_of,
)
from xstilts.trainer.config import RunResult, Stage
from xstilts.trainer.tasks import TASKS, Format

AVG = "avg"  # every evaluated language, English included
ZERO_SHOT = "zero-shot"  # every evaluated language but English: the headline
ENGLISH = "en"
ALL_TARGETS = "all targets"  # the trend of the gain averaged over targets
POINTS = 100.0  # metrics are fractions; the report speaks in points


@dataclass(frozen=True)
class ModelInfo:
    name: str
    label: str
    parameters: int | None  # from the spec; the report prefers the count the trainer measured


@dataclass(frozen=True)
class Grid:
    """What the spec asks for: the cells a complete report has."""

    experiment: str
    models: tuple[ModelInfo, ...]
    arms: tuple[str, ...]  # intermediate tasks and multi-task groups; the baseline is implied
    targets: tuple[str, ...]
    seeds: tuple[int, ...]
    languages: Mapping[str, tuple[str, ...]]  # target -> evaluated languages
    # spec.replication's (targetHalfWidth, maxSeeds, unit), when seeds are added to reach a precision
    replication: tuple[float, int, str] | None = None
    # The learning rates each stage searches (hyperparameters.<stage>.search); empty: no search.
    intermediate_learning_rates: tuple[float, ...] = ()
    target_learning_rates: tuple[float, ...] = ()

    def metric(self, target: str) -> str:
        metric: str = TASKS[target].metric
        return metric


def grid_of(spec: ExperimentSpec) -> Grid:
    return Grid(
        experiment=spec.name,
        models=tuple(ModelInfo(m.name, m.label, m.parameter_count) for m in spec.models),
        arms=tuple(spec.intermediates),
        targets=tuple(spec.targets),
        seeds=tuple(spec.initial_seeds),
        languages={t: tuple(spec.eval_languages.get(t) or TASKS[t].languages) for t in spec.targets},
        replication=None if spec.replication is None else (spec.replication.target_half_width,
                                                           spec.replication.max_seeds, spec.replication.unit),
        intermediate_learning_rates=spec.hyperparameters.intermediate.learning_rates,
        target_learning_rates=spec.hyperparameters.target.learning_rates,
    )


def replication_text(gain: Interval, target_half_width: float, max_seeds: int) -> str:
    """Where a cell's (or a model average's) headline gain stands against spec.replication:
    the rule reconcile adds seeds by (reconcile.replication_cells), on the same interval."""
    width = "?" if gain.half_width is None else f"{gain.half_width:.2f}"
    if gain.half_width is not None and gain.half_width <= target_half_width:
        return f"reached ±{width}"
    if gain.n >= max_seeds:
        return f"stopped at max seeds, ±{width}"
    return f"±{width} with {gain.n} seeds, more to come"


# Scores of one target run, by language plus AVG when every language is there.
Scores = dict[str, float]
RunKey = tuple[str, str, str, int]  # model, arm (or baseline), target, seed


@dataclass(frozen=True)
class GainCell:
    model: str
    arm: str
    target: str
    language: str  # a language code or AVG
    gain: Interval  # points


@dataclass(frozen=True)
class BestArm:
    model: str
    arm: str
    gain: Interval  # zero-shot gain averaged over targets


@dataclass(frozen=True)
class SearchChoice:
    """A learning-rate search's outcome for one model × arm (× target at the target stage)."""

    stage: Stage
    model: str
    arm: str
    target: str | None  # None for the phase-2 search
    selected: float | None  # None until every candidate has every seed
    dev: Mapping[float, float]  # candidate -> mean English dev score (points) over its seeds so far


@dataclass(frozen=True)
class Report:
    grid: Grid
    parameters: Mapping[str, int | None]  # model -> parameter count (measured when known)
    scores: Mapping[tuple[str, str, str, str], Interval]  # (model, arm, target, language) -> points
    cells: tuple[GainCell, ...]
    model_averages: Mapping[tuple[str, str], Interval]  # (model, arm) -> zero-shot gain over targets
    best: tuple[BestArm, ...]
    missing: tuple[str, ...]  # one line per gap, for humans
    results_used: int
    methods: frozenset[Method] = field(default_factory=frozenset)
    # (model, arm) -> gain over targets averaged over every language, English included
    model_averages_all: Mapping[tuple[str, str], Interval] = field(default_factory=dict)
    # (arm, target or ALL_TARGETS) -> slope of the zero-shot gain against log10(parameters)
    trends: Mapping[tuple[str, str], Trend] = field(default_factory=dict)
    # The XTREME average (Hu et al. 2020): each XTREME target's mean over its languages, then
    # the mean over those targets, per seed; its mean and interval over seeds, per (model, arm
    # or baseline), and its gain per (model, arm). Empty when the grid has no XTREME target.
    xtreme: Mapping[tuple[str, str], Interval] = field(default_factory=dict)
    xtreme_gains: Mapping[tuple[str, str], Interval] = field(default_factory=dict)
    # (model, arm, target) -> headline gain under target-dev ("oracle") model selection
    oracle_gains: Mapping[tuple[str, str, str], Interval] = field(default_factory=dict)
    # (model, arm, target, language) -> (gain, low, high) from the example-level paired bootstrap
    example_gains: Mapping[tuple[str, str, str, str], tuple[float, float, float]] = field(default_factory=dict)
    # Each learning-rate search's selection and its alternatives (empty without a search)
    search: tuple[SearchChoice, ...] = ()

    @property
    def models_by_size(self) -> list[ModelInfo]:
        """Smallest first; models of unknown size last, in spec order."""
        order = {m.name: i for i, m in enumerate(self.grid.models)}

        def key(m: ModelInfo) -> tuple[int, float, int]:
            n = self.parameters.get(m.name)
            return (n is None, float(n or 0), order[m.name])

        return sorted(self.grid.models, key=key)

    def cell(self, model: str, arm: str, target: str, language: str) -> GainCell | None:
        return self._cells.get((model, arm, target, language))

    @cached_property
    def _cells(self) -> dict[tuple[str, str, str, str], GainCell]:
        return {(c.model, c.arm, c.target, c.language): c for c in self.cells}

    @property
    def complete(self) -> bool:
        return not self.missing


# --- from result records to gains -----------------------------------------------------------


SearchKey = tuple[str, str, str, int, float]  # model, arm, target ("" for phase 2), seed, learning rate


def _latest(results: Iterable[RunResult], grid: Grid, stage: Stage) -> dict[SearchKey, RunResult]:
    """The runs of `stage` the grid contains, by (model, arm, target or "", seed, learning rate).
    Should one have several records (a rerun under another storage root), the latest one counts."""
    latest: dict[SearchKey, RunResult] = {}
    models = {m.name for m in grid.models}
    for r in results:
        labels = r.config.labels
        if r.config.stage is not stage or labels is None or labels.model not in models:
            continue
        if stage is Stage.TARGET and (labels.target is None or labels.target not in grid.targets):
            continue
        if labels.intermediate not in (BASELINE, *grid.arms):
            continue
        key = (labels.model, labels.intermediate, labels.target or "", r.config.seed,
               r.config.hyperparameters.learning_rate)
        if key not in latest or r.finished_at > latest[key].finished_at:
            latest[key] = r
    return latest


def search_choices(results: Iterable[RunResult], grid: Grid) -> list[SearchChoice]:
    """Every search's selection (search.select: the best English dev mean over the grid's seeds,
    once every candidate has them all), phase 2 first."""
    results = list(results)
    out: list[SearchChoice] = []
    for stage, candidates in ((Stage.INTERMEDIATE, grid.intermediate_learning_rates),
                              (Stage.TARGET, grid.target_learning_rates)):
        if not candidates:
            continue
        dev: dict[tuple[str, str, str], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
        for (model, arm, target, seed, lr), r in _latest(results, grid, stage).items():
            value = english_dev(r)
            if value is not None and lr in candidates:
                dev[(model, arm, target)][lr][seed] = value * POINTS
        arms = grid.arms if stage is Stage.INTERMEDIATE else (BASELINE, *grid.arms)
        targets = ("",) if stage is Stage.INTERMEDIATE else tuple(
            t for t in grid.targets if TASKS[t].format is not Format.RETRIEVAL)
        started = _started_from(results) if stage is Stage.INTERMEDIATE else {}
        for m in grid.models:
            for arm in arms:
                for target in targets:
                    by_lr = dev.get((m.name, arm, target), {})
                    # Target runs start from one candidate only, the one reconcile selected (where a
                    # candidate failed, among the others: results do not show failures); it stays selected.
                    from_runs = started.get((m.name, arm), set())
                    chosen = next(iter(from_runs)) if len(from_runs) == 1 else select(by_lr, candidates, grid.seeds)
                    out.append(SearchChoice(stage, m.name, arm, target or None, chosen, dev_means(by_lr, candidates)))
    return out


def _started_from(results: Sequence[RunResult]) -> dict[tuple[str, str], set[float]]:
    """Per (model, arm), the phase-2 learning rates that arm target runs with a result started from."""
    phase2 = {r.run_id: r.config.hyperparameters.learning_rate for r in results if r.config.stage is Stage.INTERMEDIATE}
    started: dict[tuple[str, str], set[float]] = defaultdict(set)
    for r in results:
        labels = r.config.labels
        if r.config.stage is Stage.TARGET and labels is not None and r.config.init_from_run in phase2:
            started[(labels.model, labels.intermediate)].add(phase2[r.config.init_from_run])
    return started


def target_scores(results: Iterable[RunResult], grid: Grid, oracle: bool = False) -> dict[RunKey, Scores]:
    """Per-language scores (points) of every target run the grid contains. Should one cell have
    several records (a rerun under another storage root), the latest one counts. Under a
    learning-rate search, only the runs of the selected rates count (`search_choices`): a
    cell whose selection is not decided yet has no scores."""
    results = list(results)
    latest = _latest(results, grid, Stage.TARGET)
    if grid.target_learning_rates or grid.intermediate_learning_rates:
        choices = search_choices(results, grid)
        phase2 = {(c.model, c.arm): c.selected for c in choices if c.stage is Stage.INTERMEDIATE}
        by_target = {(c.model, c.arm, c.target): c.selected for c in choices if c.stage is Stage.TARGET}
        phase2_lr = {r.run_id: r.config.hyperparameters.learning_rate for r in results
                     if r.config.stage is Stage.INTERMEDIATE}
        kept: dict[SearchKey, RunResult] = {}
        for key, r in latest.items():
            model, arm, name = key[0], key[1], key[2]
            if grid.target_learning_rates and TASKS[name].format is not Format.RETRIEVAL \
                    and by_target.get((model, arm, name)) != key[4]:
                continue
            if grid.intermediate_learning_rates and arm != BASELINE and (
                    phase2.get((model, arm)) is None
                    or phase2_lr.get(r.config.init_from_run or "") != phase2[(model, arm)]):
                continue
            kept[key] = r
        latest = kept
    per_cell: dict[RunKey, RunResult] = {}  # without a search, a rerun with another rate replaces the run
    for (model, arm, name, seed, _), r in latest.items():
        if (model, arm, name, seed) not in per_cell or r.finished_at > per_cell[(model, arm, name, seed)].finished_at:
            per_cell[(model, arm, name, seed)] = r
    out: dict[RunKey, Scores] = {}
    for cell, r in per_cell.items():
        target = cell[2]
        scores: Scores = {}
        for lang in grid.languages[target]:
            # oracle: the test scores under target-dev model selection (RunResult.oracle_languages)
            value = (r.oracle_languages if oracle else r.languages).get(lang, {}).get(r.primary_metric)
            if value is not None:
                scores[lang] = value * POINTS
        if scores and len(scores) == len(grid.languages[target]):
            foreign = [v for lang, v in scores.items() if lang != ENGLISH]
            scores[AVG] = statistics.fmean(scores.values())
            if foreign:
                scores[ZERO_SHOT] = statistics.fmean(foreign)
        out[cell] = scores
    return out


Cell = tuple[str, str, str]  # model, arm (or baseline), target
GainFunction = Callable[[Mapping[int, float], Mapping[int, float]], Interval | None]


def seed_scores(scores: Mapping[RunKey, Scores], language: str) -> dict[Cell, dict[int, float]]:
    """Per (model, arm, target), each seed's score in `language` (a language code or AVG)."""
    cells: dict[Cell, dict[int, float]] = {}
    for (model, arm, target, seed), s in scores.items():
        if language in s:
            cells.setdefault((model, arm, target), {})[seed] = s[language]
    return cells


def arm_gains(cells: Mapping[Cell, Mapping[int, float]], gain: GainFunction = gain_interval) -> dict[Cell, Interval]:
    """Each arm's gain over the baseline of its model and target, in the order of `cells`. The
    report's cells and the controller's bestGain both come from here; `gain` is
    stats.gain_interval or a cached form of it."""
    out: dict[Cell, Interval] = {}
    for (model, arm, target), treated in cells.items():
        if arm == BASELINE:
            continue
        interval = gain(treated, cells.get((model, BASELINE, target), {}))
        if interval is not None:
            out[(model, arm, target)] = interval
    return out


def headline(grid: Grid, target: str) -> str:
    """The language average a target's gain is judged by: zero-shot, unless the target is
    evaluated in English only."""
    return ZERO_SHOT if any(lang != ENGLISH for lang in grid.languages[target]) else AVG


def _seeds_seen(scores: Mapping[RunKey, Scores]) -> list[int]:
    return sorted({k[3] for k in scores})


def xtreme_targets(grid: Grid) -> tuple[str, ...]:
    return tuple(t for t in grid.targets if TASKS[t].xtreme)


XTREME_TASKS = sum(1 for t in TASKS.values() if t.xtreme)


def _over_targets(scores: Mapping[RunKey, Scores], grid: Grid, model: str, arm: str,
                  zero_shot: bool = True, targets: Sequence[str] | None = None) -> dict[int, float]:
    """Per seed, the language-average score (zero-shot, or every language) averaged over every
    target (or `targets`); only seeds that have all of them, so that each seed's number means
    the same thing."""
    out = {}
    for seed in _seeds_seen(scores):
        values = [scores.get((model, arm, t, seed), {}).get(headline(grid, t) if zero_shot else AVG)
                  for t in (grid.targets if targets is None else targets)]
        if all(v is not None for v in values):
            out[seed] = statistics.fmean(v for v in values if v is not None)
    return out


# Per-example test outcomes of a run (its predictions.parquet): language -> example -> (score, weight)
Outcomes = Mapping[str, Mapping[int, tuple[float, float]]]


def build_report(results: Iterable[RunResult], grid: Grid, predictions: Mapping[str, Outcomes] | None = None) -> Report:
    """`predictions`: per xstilts run id, the run's per-example outcomes, for the example-level
    bootstrap (runs without them leave it out)."""
    results = list(results)
    scores = target_scores(results, grid)
    arms_with_baseline = (BASELINE, *grid.arms)
    absolute: dict[tuple[str, str, str, str], Interval] = {}
    cells: list[GainCell] = []
    languages = {AVG, ZERO_SHOT}.union(*grid.languages.values())
    by_language = {language: seed_scores(scores, language) for language in languages}
    gains = {language: arm_gains(seeds) for language, seeds in by_language.items()}
    for m in grid.models:
        for target in grid.targets:
            for language in (*grid.languages[target], ZERO_SHOT, AVG):
                for arm in arms_with_baseline:
                    values = by_language[language].get((m.name, arm, target))
                    if values:
                        absolute[(m.name, arm, target, language)] = mean_interval(list(values.values()))
                for arm in grid.arms:
                    gain = gains[language].get((m.name, arm, target))
                    if gain is not None:
                        cells.append(GainCell(m.name, arm, target, language, gain))
    averages: dict[tuple[str, str], Interval] = {}
    averages_all: dict[tuple[str, str], Interval] = {}
    best: list[BestArm] = []
    for m in grid.models:
        base = _over_targets(scores, grid, m.name, BASELINE)
        base_all = _over_targets(scores, grid, m.name, BASELINE, zero_shot=False)
        for arm in grid.arms:
            gain = gain_interval(_over_targets(scores, grid, m.name, arm), base)
            if gain is not None:
                averages[(m.name, arm)] = gain
            gain = gain_interval(_over_targets(scores, grid, m.name, arm, zero_shot=False), base_all)
            if gain is not None:
                averages_all[(m.name, arm)] = gain
        candidates = [(averages[(m.name, a)].mean, -i, a) for i, a in enumerate(grid.arms) if (m.name, a) in averages]
        if candidates:
            _, _, arm = max(candidates)
            best.append(BestArm(m.name, arm, averages[(m.name, arm)]))
    xtreme, xtreme_gains = xtreme_averages(scores, grid)
    methods = frozenset(c.gain.method for c in cells) | frozenset(g.method for g in averages.values())
    methods |= frozenset(g.method for g in xtreme_gains.values())
    parameters = measured_parameters(results, grid)
    return Report(grid, parameters, absolute, tuple(cells), averages, tuple(best),
                  tuple(missing_lines(scores, grid)), len(results), methods, averages_all,
                  trends(scores, grid, parameters), xtreme, xtreme_gains, oracle_gains(results, grid),
                  example_gains(results, grid, predictions or {}), tuple(search_choices(results, grid)))


EXAMPLE_REPLICATES = 2000


def _matrix(runs: Sequence[Mapping[int, tuple[float, float]]], order: Sequence[int], part: int) -> np.ndarray:
    """runs × examples: the score (part 0) or weight (part 1) of each example in `order`."""
    return np.array([[run[e][part] for e in order] for run in runs], dtype=float)


def example_gains(results: Sequence[RunResult], grid: Grid,
                  predictions: Mapping[str, Outcomes]) -> dict[tuple[str, str, str, str], tuple[float, float, float]]:
    """Per (model, arm, target, language): the gain and its 95% interval from the
    example-level paired bootstrap (stats.example_bootstrap) over the seeds whose baseline and
    intermediate runs both kept their predictions, on the examples they all scored."""
    runs: dict[RunKey, str] = {}
    for r in results:
        labels = r.config.labels
        if labels is not None and labels.target is not None and r.run_id in predictions:
            runs[(labels.model, labels.intermediate, labels.target, r.config.seed)] = r.run_id
    out: dict[tuple[str, str, str, str], tuple[float, float, float]] = {}
    for m in grid.models:
        for target in grid.targets:
            for arm in grid.arms:
                seeds = sorted(k[3] for k in runs if k[:3] == (m.name, arm, target)
                               and (m.name, BASELINE, target, k[3]) in runs)
                if not seeds:
                    continue
                pairs = [(predictions[runs[(m.name, arm, target, s)]], predictions[runs[(m.name, BASELINE, target, s)]])
                         for s in seeds]
                for lang in grid.languages[target]:
                    common = set.intersection(*(set(t.get(lang, {})) & set(b.get(lang, {})) for t, b in pairs))
                    if not common:
                        continue
                    order = sorted(common)
                    t, b = [p[0][lang] for p in pairs], [p[1][lang] for p in pairs]
                    out[(m.name, arm, target, lang)] = example_bootstrap(
                        _matrix(t, order, 0), _matrix(t, order, 1), _matrix(b, order, 0), _matrix(b, order, 1),
                        replicates=EXAMPLE_REPLICATES)
    return out


def oracle_gains(results: Sequence[RunResult], grid: Grid) -> dict[tuple[str, str, str], Interval]:
    """Each cell's headline gain when every run's checkpoint is chosen by the target-language
    dev sets instead of the English one (runs without them leave their cell out)."""
    scores = target_scores(results, grid, oracle=True)
    out: dict[tuple[str, str, str], Interval] = {}
    for target in grid.targets:
        cells = seed_scores({k: s for k, s in scores.items() if k[2] == target}, headline(grid, target))
        out |= arm_gains(cells)
    return out


def trends(scores: Mapping[RunKey, Scores], grid: Grid,
           parameters: Mapping[str, int | None]) -> dict[tuple[str, str], Trend]:
    """Per arm, the slope of the zero-shot gain against log10(parameters): per target, and of
    the gain averaged over targets (ALL_TARGETS). Models of unknown size take no part."""
    by_language = {language: seed_scores(scores, language) for language in (ZERO_SHOT, AVG)}
    out: dict[tuple[str, str], Trend] = {}
    sized = [(m.name, math.log10(n)) for m in grid.models if (n := parameters.get(m.name))]
    for arm in grid.arms:
        for target in (*grid.targets, ALL_TARGETS):
            samples: list[SeedSample] = []
            for model, x in sized:
                if target == ALL_TARGETS:
                    treated = _over_targets(scores, grid, model, arm)
                    base = _over_targets(scores, grid, model, BASELINE)
                else:
                    language = headline(grid, target)
                    treated = by_language[language].get((model, arm, target), {})
                    base = by_language[language].get((model, BASELINE, target), {})
                if (sample := seed_sample(x, treated, base)) is not None:
                    samples.append(sample)
            if (trend := trend_of(samples)) is not None:
                out[(arm, target)] = trend
    return out


def xtreme_averages(scores: Mapping[RunKey, Scores], grid: Grid) -> tuple[dict[tuple[str, str], Interval],
                                                                          dict[tuple[str, str], Interval]]:
    """The XTREME average per (model, arm) with its interval over seeds, and its gain over the
    baseline per (model, arm): from seeds that have every XTREME target of the grid."""
    targets = xtreme_targets(grid)
    absolute: dict[tuple[str, str], Interval] = {}
    gains: dict[tuple[str, str], Interval] = {}
    if not targets:
        return absolute, gains
    for m in grid.models:
        per_seed = {arm: _over_targets(scores, grid, m.name, arm, zero_shot=False, targets=targets)
                    for arm in (BASELINE, *grid.arms)}
        for arm, values in per_seed.items():
            if values:
                absolute[(m.name, arm)] = mean_interval(list(values.values()))
            if arm != BASELINE:
                gain = gain_interval(values, per_seed[BASELINE])
                if gain is not None:
                    gains[(m.name, arm)] = gain
    return absolute, gains



def measured_parameters(results: Iterable[RunResult], grid: Grid) -> dict[str, int | None]:
    """Each model's parameter count as the trainer counted it (encoder only would differ by the
    head; the median over runs smooths that), else the spec's."""
    counts: dict[str, list[int]] = defaultdict(list)
    for r in results:
        if r.config.labels is not None:
            counts[r.config.labels.model].append(r.parameter_count)
    return {m.name: int(statistics.median(counts[m.name])) if counts[m.name] else m.parameters for m in grid.models}


def _seed_list(seeds: Iterable[int]) -> str:
    seeds = sorted(seeds)
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def missing_lines(scores: Mapping[RunKey, Scores], grid: Grid) -> list[str]:
    """What a complete report would have and this one lacks: target results per seed, gains
    without a baseline or an intermediate result, languages a result did not evaluate."""
    lines: list[str] = []
    for m in grid.models:
        for target in grid.targets:
            have = {arm: {s for s in grid.seeds if (m.name, arm, target, s) in scores}
                    for arm in (BASELINE, *grid.arms)}
            for arm, seeds in have.items():
                lacking = [s for s in grid.seeds if s not in seeds]
                if lacking:
                    lines.append(f"{m.name} · {arm} → {target}: no result for {_seed_list(lacking)}")
            for arm in grid.arms:
                if not have[BASELINE] or not have[arm]:
                    side = "baseline" if not have[BASELINE] else arm
                    what = "baseline and intermediate results" if not have[BASELINE] and not have[arm] else (
                        f"{side} results")
                    lines.append(f"{m.name} · {arm} → {target}: no gain, it lacks {what}")
            for arm in (BASELINE, *grid.arms):
                for seed in sorted(have[arm]):
                    have_scores = scores[(m.name, arm, target, seed)]
                    absent = [lang for lang in grid.languages[target] if lang not in have_scores]
                    if absent:
                        lines.append(f"{m.name} · {arm} → {target} seed {seed}: no score for {', '.join(absent)}")
    return lines


# --- rendering ------------------------------------------------------------------------------


def fmt_points(value: float) -> str:
    return f"{value:+.2f}"


def fmt_interval(gain: Interval, signed: bool = True) -> str:
    mean = fmt_points(gain.mean) if signed else f"{gain.mean:.2f}"
    if gain.half_width is None:
        return f"{mean} (n=1)"
    mark = "†" if gain.method is Method.WELCH else ""
    return f"{mean} ± {gain.half_width:.2f}{mark}"


def fmt_parameters(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


@dataclass(frozen=True)
class TableData:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    note: str = ""


def excludes_zero_text(excludes: bool) -> str:
    return "excludes 0" if excludes else "includes 0"


def fmt_slope(trend: Trend) -> str:
    return f"{trend.slope:+.2f} [{trend.low:+.2f}, {trend.high:+.2f}]"


def verdict_lines(report: Report) -> list[str]:
    """One line per arm: how its zero-shot gain (averaged over targets) changes with size."""
    lines = []
    for arm in report.grid.arms:
        trend = report.trends.get((arm, ALL_TARGETS))
        if trend is None:
            lines.append(f"{arm}: no trend yet (it needs gains for at least two model sizes).")
            continue
        lines.append(f"{arm}: {trend.verdict.value}: {trend.slope:+.2f} points of zero-shot gain per tenfold"
                     f" parameters, 95% interval [{trend.low:+.2f}, {trend.high:+.2f}],"
                     f" {excludes_zero_text(trend.excludes_zero)} ({trend.models} models).")
    return lines


def trend_method_text() -> str:
    return ("The trend is the least-squares slope of the zero-shot gain against log10(parameters) over"
            " models, in points per tenfold increase in parameters. Its 95% interval comes from a"
            f" hierarchical bootstrap ({BOOTSTRAP_REPLICATES} replicates, fixed random seed): the models stay"
            " (their sizes are chosen, not sampled); within each model its seeds are resampled (the"
            " seed-paired gains, widened by √(n/(n−1))), the model's mean gain recomputed and the line"
            " refitted. The interval is the slope plus the 2.5% and 97.5% quantiles of the replicates'"
            " deviations, widened by t(0.975, seeds − models)/z(0.975) for the few seeds. A verdict says the"
            " gain grows or shrinks only when this interval excludes zero.")


def method_text(report: Report) -> str:
    seeds = len(report.grid.seeds)
    text = (f"Gains are differences in points (metric × 100) against the baseline of the same model and"
            f" target; ± is the half-width of the 95% confidence interval over seeds ({seeds} planned)"
            " from Student's t distribution over seed-paired differences (the same seed with and without"
            " intermediate training).")
    if Method.WELCH in report.methods:
        text += (" † marks cells with fewer than two seed pairs, where the interval is Welch's t over the"
                 " two independent samples.")
    if Method.SINGLE in report.methods:
        text += " (n=1) marks cells with a single value: a mean without an interval."
    return text + (f" \"{ZERO_SHOT}\" averages the target's languages other than English (the headline);"
                   f" \"{AVG}\" averages every evaluated language, English included, as XTREME does.")


def replication_table(report: Report, half_width: float, max_seeds: int, unit: str) -> TableData:
    """Where each unit of replication stands: cells on their headline gain, or with
    `unit: modelAverage` each model × arm on its gain averaged over the targets."""
    title = f"Replication: seeds added until the gain interval is within ±{half_width:g} points"
    if unit == "modelAverage":
        rows = tuple((m.name, a, "all targets", str(gain.n), fmt_interval(gain),
                      replication_text(gain, half_width, max_seeds))
                     for m in report.models_by_size for a in report.grid.arms
                     if (gain := report.model_averages.get((m.name, a))) is not None)
    else:
        rows = tuple((c.model, c.arm, c.target, str(c.gain.n), fmt_interval(c.gain),
                      replication_text(c.gain, half_width, max_seeds))
                     for c in report.cells if c.language == headline(report.grid, c.target))
    return TableData(title, ("model", "intermediate", "target", "seeds", f"{ZERO_SHOT} gain", "precision"), rows,
                     "" if rows else "No cell has both baseline and intermediate results yet.")


def tables(report: Report) -> list[TableData]:
    g = report.grid
    models = report.models_by_size
    out: list[TableData] = []
    out.append(trend_table(report))
    if g.replication is not None:
        out.append(replication_table(report, *g.replication))
    out.append(TableData(
        "Best intermediate task per model size",
        ("model", "parameters", "best intermediate", "zero-shot gain (over targets)", "95% interval"),
        tuple((m.label, fmt_parameters(report.parameters.get(m.name)), b.arm, fmt_interval(b.gain),
               excludes_zero_text(b.gain.excludes_zero))
              for m in models for b in report.best if b.model == m.name),
        "" if report.best else "No model has both baseline and intermediate results yet.",
    ))

    def average(table: Mapping[tuple[str, str], Interval], model: str, arm: str) -> str:
        return fmt_interval(table[(model, arm)]) if (model, arm) in table else "–"

    out.append(TableData(
        "Average gain per model (over targets): zero-shot languages, and all languages",
        ("model", "parameters", "intermediate", f"{ZERO_SHOT} gain", "95% interval", f"{AVG} gain"),
        tuple((m.label, fmt_parameters(report.parameters.get(m.name)), a,
               average(report.model_averages, m.name, a),
               excludes_zero_text(report.model_averages[(m.name, a)].excludes_zero)
               if (m.name, a) in report.model_averages else "–",
               average(report.model_averages_all, m.name, a))
              for m in models for a in g.arms),
    ))
    out.append(selection_table(report))
    if report.search:
        out.append(search_table(report))
    out.append(example_table(report))
    targets = xtreme_targets(g)
    if targets:
        scope = "all 9 tasks" if len(targets) == XTREME_TASKS else f"{len(targets)} of its {XTREME_TASKS} tasks"
        xtreme_rows: list[tuple[str, ...]] = []
        for m in models:
            for arm in (BASELINE, *g.arms):
                score = report.xtreme.get((m.name, arm))
                gain = report.xtreme_gains.get((m.name, arm))
                xtreme_rows.append((m.label, arm, fmt_interval(score, signed=False) if score else "–",
                             fmt_interval(gain) if gain else "–"))
        out.append(TableData(
            f"XTREME average ({scope}: {', '.join(targets)})", ("model", "intermediate", "score", "gain"),
            tuple(xtreme_rows), "Each task's mean over its languages, then the mean over tasks (as the XTREME paper"
            " averages), per seed; ± over seeds. Points of each task's metric (F1 or accuracy)."))
    for target in g.targets:
        languages = (*g.languages[target], ZERO_SHOT, AVG)
        rows = []
        for m in models:
            for arm in g.arms:
                cells = [report.cell(m.name, arm, target, lang) for lang in languages]
                rows.append((m.label, arm, *(fmt_interval(c.gain) if c else "–" for c in cells)))
        out.append(TableData(f"Gain on {target} by language ({g.metric(target)}, points)",
                             ("model", "intermediate", *languages), tuple(rows)))
        rows = []
        for m in models:
            for arm in (BASELINE, *g.arms):
                values = [report.scores.get((m.name, arm, target, lang)) for lang in languages]
                rows.append((m.label, arm, *(f"{v.mean:.2f}" if v else "–" for v in values)))
        out.append(TableData(f"{target} {g.metric(target)} by language (mean over seeds)",
                             ("model", "intermediate", *languages), tuple(rows)))
    return out


def trend_table(report: Report) -> TableData:
    rows = []
    for arm in report.grid.arms:
        for target in (*report.grid.targets, ALL_TARGETS):
            trend = report.trends.get((arm, target))
            if trend is not None:
                rows.append((arm, target, fmt_slope(trend), excludes_zero_text(trend.excludes_zero),
                             trend.verdict.value, " ".join(map(str, trend.seeds))))
    return TableData(
        "Trend of the zero-shot gain with model size (points per tenfold parameters)",
        ("intermediate", "target", "slope [95% interval]", "interval", "verdict", "seeds per model"),
        tuple(rows), "" if rows else "No trend yet: it needs gains for at least two model sizes.")


def selection_table(report: Report) -> TableData:
    """English-dev selection (XTREME's protocol) beside target-dev selection (the oracle)."""
    rows = []
    for m in report.models_by_size:
        for arm in report.grid.arms:
            for target in report.grid.targets:
                english = report.cell(m.name, arm, target, headline(report.grid, target))
                oracle = report.oracle_gains.get((m.name, arm, target))
                if english or oracle:
                    rows.append((m.label, arm, target, fmt_interval(english.gain) if english else "–",
                                 fmt_interval(oracle) if oracle else "–"))
    return TableData(
        "Zero-shot gain under both model-selection protocols",
        ("model", "intermediate", "target", "English-dev selected", "target-dev selected (oracle)"),
        tuple(rows),
        "English-dev: the checkpoint the English dev set scored best (XTREME's protocol). Target-dev: for each"
        " language, the checkpoint its own dev set scored best, an upper bound (Keung et al. 2020)."
        + ("" if report.oracle_gains else " No run recorded target-language dev scores yet."))


def fmt_rate(lr: float) -> str:
    return f"{lr:g}"


def search_table(report: Report) -> TableData:
    """The learning-rate search: per stage, model and arm (and target), the selected rate and
    every candidate's English dev score."""
    labels = {m.name: m.label for m in report.grid.models}
    rows = []
    for c in report.search:
        alternatives = ", ".join(f"{fmt_rate(lr)}: {v:.2f}" for lr, v in c.dev.items()) or "–"
        rows.append((c.stage.value, labels.get(c.model, c.model), c.arm, c.target or "–",
                     fmt_rate(c.selected) if c.selected is not None else "not yet", alternatives))
    return TableData(
        "Learning-rate search",
        ("stage", "model", "intermediate", "target", "selected", "English dev per rate (mean over seeds)"),
        tuple(rows),
        "Each rate is its own runs; the rate whose runs score best on the English dev set, as a mean over"
        " the seeds, is selected once every rate has every seed. Gains use only the selected runs; a phase-3"
        " run of an intermediate arm starts from the phase-2 run of its selected rate.")


def example_table(report: Report) -> TableData:
    rows = tuple((m.label, arm, target, lang, fmt_points(g[0]), f"[{g[1]:+.2f}, {g[2]:+.2f}]",
                  excludes_zero_text(g[1] > 0 or g[2] < 0))
                 for m in report.models_by_size for arm in report.grid.arms for target in report.grid.targets
                 for lang in report.grid.languages[target]
                 if (g := report.example_gains.get((m.name, arm, target, lang))) is not None)
    return TableData(
        "Example-level paired bootstrap per language (test-set sampling)",
        ("model", "intermediate", "target", "language", "gain", "95% interval", "interval"), rows,
        f"Test examples resampled ({EXAMPLE_REPLICATES} times, fixed random seed), the same draw for every run;"
        " each seed's intermediate run paired with its baseline run, the gain averaged over seeds. This"
        " interval is the test set's sampling noise; the ± over seeds above is the training noise."
        + ("" if rows else " No run kept its per-example predictions yet."))


@dataclass(frozen=True)
class Figure:
    file_name: str
    caption: str
    png: bytes = b""


def summary_line(report: Report) -> str:
    g = report.grid
    planned = len(g.models) * (len(g.arms) + 1) * len(g.targets) * len(g.seeds)
    have = len({(k.model, k.arm, k.target) for k in report.cells if k.language == AVG})
    return (f"{report.results_used} result records; {len(g.models)} models × {len(g.arms)} intermediate"
            f" arms × {len(g.targets)} targets × {len(g.seeds)} seeds ({planned} target runs planned);"
            f" gains for {have} of {len(g.models) * len(g.arms) * len(g.targets)} model × intermediate × target"
            " cells" + ("." if report.complete else f"; {len(report.missing)} gaps listed under Missing."))


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: Report, figures: Sequence[Figure] = ()) -> str:
    lines = [f"# {report.grid.experiment}: gain from English intermediate-task training vs model size", "",
             "## The answer", ""]
    lines += [f"- {line}" for line in verdict_lines(report)]
    lines += ["", trend_method_text(), "", summary_line(report), "", method_text(report), ""]
    for fig in figures:
        lines += [f"![{fig.caption}]({fig.file_name})", "", f"*{fig.caption}*", ""]
    for t in tables(report):
        lines += [f"## {t.title}", ""]
        if t.rows:
            lines.append("| " + " | ".join(_md_cell(h) for h in t.headers) + " |")
            lines.append("|" + "|".join("---" for _ in t.headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            lines.append("")
        if t.note:
            lines += [t.note, ""]
    lines += ["## Missing", ""]
    lines += [f"- {m}" for m in report.missing] or ["Nothing: every planned cell has its results."]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:75em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:0.25em 0.6em;
text-align:right}th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}
figure{margin:1em 0}img{max-width:100%}figcaption{font-style:italic;color:#555}.pos{color:#176117}
.neg{color:#9b1c1c}"""


def _html_cell(text: str) -> str:
    cls = ' class="pos"' if text.startswith("+") and not text.startswith("+0.00") else (
        ' class="neg"' if text.startswith("-") else "")
    return f"<td{cls}>{html.escape(text)}</td>"


def to_html(report: Report, figures: Sequence[Figure] = ()) -> str:
    """One self-contained page: the plots inlined as base64 PNG data URIs."""
    e = html.escape
    title = f"{report.grid.experiment}: gain from English intermediate-task training vs model size"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>", "<h2>The answer</h2>",
             '<ul class="verdicts">' + "".join(f"<li>{e(line)}</li>" for line in verdict_lines(report)) + "</ul>",
             f"<p>{e(trend_method_text())}</p>",
             f"<p>{e(summary_line(report))}</p>", f"<p>{e(method_text(report))}</p>"]
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f'<figure><img alt="{e(fig.caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{e(fig.caption)}</figcaption></figure>")
    for t in tables(report):
        parts.append(f"<h2>{e(t.title)}</h2>")
        if t.rows:
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.headers) + "</tr></thead><tbody>")
            parts += ["<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.rows]
            parts.append("</tbody></table>")
        if t.note:
            parts.append(f"<p>{e(t.note)}</p>")
    parts.append("<h2>Missing</h2>")
    if report.missing:
        parts.append("<ul>" + "".join(f"<li>{e(m)}</li>" for m in report.missing) + "</ul>")
    else:
        parts.append("<p>Nothing: every planned cell has its results.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
