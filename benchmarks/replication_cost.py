"""The cost of precision-driven replication against a fixed seed count, by simulation.

Precision-driven replication (spec.replication) gives each unit (a cell, model × intermediate
arm × target; or with `unit: modelAverage` a model × arm over the targets) another seed only
while its paired gain interval is wider than the target. A fixed seed list must instead give
every unit the seeds its noisiest unit needs. This compares the
two on examples/scaling.yaml (4 models × 4 arms × 2 targets = 32 cells): for each simulated
experiment, the seeds each cell takes under `replication: {targetHalfWidth, minSeeds,
maxSeeds}` are decided by reconcile's own rule (`replication_cells`, `replicated`: the
runs and GPU-hours counted are those of the plan it extends), then the smallest fixed seed
count whose worst cell is at least as precise as the worst cell under replication is found
on the same simulated scores. It prints the runs, GPU-hours and their ratios.

Per-unit seed variances: the paired (same seed, with and without the intermediate task)
standard deviations of the gain, in points, as a dict per unit. With `--spreads-from DIR` (the
output directory of a finished `xstilts run examples/demo.yaml`, e.g. xstilts-out/demo) they
are measured from the demo's own results: each unit's paired differences of the zero-shot
average (over the targets, for a model average), the quantity reconcile judges. A model
average's draw is the same for each of its targets, so their mean has the measured spread.
Without it, each cell draws its standard deviation
log-uniformly from 0.3 to 2 points (fixed RNG seed). Per-seed gains are normal around +2 points.

Two halves:
- `--spec examples/scaling.yaml` (default): the scaling study by simulation; its 32 cells draw
  their standard deviations from the demo's 18 measured ones (a fixed RNG seed picks which),
  since the demo has no XLM-R-sized cells to measure.
- `--spec examples/demo.yaml`: the demo world itself, each cell with its own measured standard
  deviation, simulated as above; with `--spreads-from`, also the real run: the runs it took
  against the fixed seed count whose every cell, at its measured spread, reaches the real run's
  worst half-width.

    python benchmarks/replication_cost.py [--spec examples/scaling.yaml] [--spreads-from xstilts-out/demo]
        [--experiments 40] [--target 1.0] [--min-seeds 3] [--max-seeds 10] [--unit cell|modelAverage]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from pathlib import Path

import yaml
from xstilts.operator.cluster.reconcile import ResultSummary, headline_score, replicated, replication_cells
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import BASELINE, ExperimentSpec
from xstilts.operator.report.stats import gain_interval, t_quantile
from xstilts.trainer.config import Stage
from xstilts.trainer.rundir import read_result

SPREAD_POINTS = (0.3, 2.0)  # without --spreads-from: the range issue 14 quoted for the demo's cells
MEAN_GAIN_POINTS = 2.0


def load_spec(path: Path, target: float | None, min_seeds: int | None, max_seeds: int | None,
              unit: str | None = None) -> ExperimentSpec:
    """The spec (bare or a kind: Experiment) with `replication:` from the arguments; a bound
    left out keeps the spec's own (examples/demo.yaml has one)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw = raw.get("spec", raw)
    raw.pop("seeds", None)
    own = raw.get("replication") or {"targetHalfWidth": 1.0, "minSeeds": 3, "maxSeeds": 10}
    raw["replication"] = {"targetHalfWidth": own["targetHalfWidth"] if target is None else target,
                          "minSeeds": own.get("minSeeds", 3) if min_seeds is None else min_seeds,
                          "maxSeeds": own.get("maxSeeds", 10) if max_seeds is None else max_seeds,
                          "unit": own.get("unit", "cell") if unit is None else unit}
    return ExperimentSpec.model_validate(raw)


Cell = tuple[str, str, str]  # model, intermediate arm, target ("" for a model average over the targets)


def measured_differences(out_dir: Path, model_average: bool = False) -> dict[Cell, dict[int, float]]:
    """Per cell (or model average), seed -> paired difference (arm − baseline) of the zero-shot
    average, in points, from the result.json files of a finished run under `out_dir`; a model
    average has the seeds every target has."""
    scores: dict[tuple[str, str, str, int], float] = {}
    for path in sorted(out_dir.glob("runs/*/result.json")):
        result = read_result(path)
        if result.config.stage is not Stage.TARGET:
            continue
        labels = result.config.labels
        average = headline_score(ResultSummary.from_result(result))
        if average is not None:
            scores[(labels.model, labels.intermediate, labels.target or "", result.config.seed)] = 100 * average
    diffs: dict[Cell, dict[int, float]] = {}
    for (model, arm, target, seed), score in scores.items():
        base = scores.get((model, BASELINE, target, seed))
        if arm != BASELINE and base is not None:
            diffs.setdefault((model, arm, target), {})[seed] = score - base
    if not model_average:
        return diffs
    averaged: dict[Cell, dict[int, float]] = {}
    for model, arm in {(m, a) for m, a, _ in diffs}:
        per_target = [d for (m, a, _), d in diffs.items() if (m, a) == (model, arm)]
        shared = set.intersection(*(set(d) for d in per_target))
        averaged[(model, arm, "")] = {s: statistics.fmean(d[s] for d in per_target) for s in sorted(shared)}
    return averaged


def measured_spreads(out_dir: Path, model_average: bool = False) -> dict[Cell, float]:
    found = {cell: statistics.stdev(d.values())
             for cell, d in measured_differences(out_dir, model_average).items() if len(d) >= 2}
    if not found:
        raise SystemExit(f"{out_dir}: no cell with two paired seeds among its runs/*/result.json")
    return found


def fixed_seeds_for(spreads: dict[Cell, float], half_width: float, most: int = 50) -> int:
    """The fewest seeds n with t(0.975, n−1)·sd/√n ≤ half_width in every cell."""
    for n in range(2, most + 1):
        if all(t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= half_width for sd in spreads.values()):
            return n
    return most


def simulate(spec: ExperimentSpec, p: Plan, spreads: dict[tuple[str, str, str], float],
             rng: random.Random) -> tuple[dict[str, ResultSummary], dict[tuple[str, str, str], list[float]]]:
    """Scores for every run up to maxSeeds (reconcile reads only what its rule reaches)."""
    assert spec.replication is not None
    model_average = spec.replication.unit == "modelAverage"
    drawn: dict[tuple[Cell, int], float] = {}
    results: dict[str, ResultSummary] = {}
    diffs: dict[tuple[str, str, str], list[float]] = {}
    base: dict[tuple[str, str, int], float] = {}
    for run in (*p.runs, *p.reserve):
        if run.config.stage is Stage.TARGET and run.labels.intermediate == BASELINE:
            base[(run.labels.model, run.labels.target or "", run.config.seed)] = 0.5 + rng.gauss(0, 0.02)
    for run in (*p.runs, *p.reserve):
        labels, seed = run.labels, run.config.seed
        if run.config.stage is Stage.INTERMEDIATE:
            results[run.run_id] = ResultSummary(run.run_id)
            continue
        score = base[(labels.model, labels.target or "", seed)]
        if labels.intermediate != BASELINE:
            cell = (labels.model, labels.intermediate, "" if model_average else labels.target or "")
            if (cell, seed) not in drawn:
                drawn[(cell, seed)] = rng.gauss(MEAN_GAIN_POINTS, spreads[cell])
                diffs.setdefault(cell, []).append(drawn[(cell, seed)])
            score += drawn[(cell, seed)] / 100
        results[run.run_id] = ResultSummary(run.run_id, {"avg": score})
    return results, diffs


def worst_half_width(diffs: dict[tuple[str, str, str], list[float]], n: int) -> float:
    worst = 0.0
    for values in diffs.values():
        interval = gain_interval({s: v for s, v in enumerate(values[:n])}, dict.fromkeys(range(n), 0.0))
        worst = max(worst, math.inf if interval is None or interval.half_width is None else interval.half_width)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=Path("examples/scaling.yaml"))
    parser.add_argument("--spreads-from", type=Path, default=None,
                        help="a finished demo run's output directory: per-cell seed spreads measured there")
    parser.add_argument("--experiments", type=int, default=40)
    parser.add_argument("--target", type=float, default=None, help="default: the spec's, else 1.0")
    parser.add_argument("--min-seeds", type=int, default=None, help="default: the spec's, else 3")
    parser.add_argument("--max-seeds", type=int, default=None, help="default: the spec's, else 10")
    parser.add_argument("--unit", choices=("cell", "modelAverage"), default=None, help="default: the spec's, else cell")
    args = parser.parse_args()
    spec = load_spec(args.spec, args.target, args.min_seeds, args.max_seeds, args.unit)
    rep = spec.replication
    assert rep is not None
    model_average = rep.unit == "modelAverage"
    units = "model averages" if model_average else "cells"
    p = plan(spec)
    cells = [(m.name, arm, t) for m in spec.models for arm in spec.intermediates
             for t in (("",) if model_average else spec.targets)]
    per_seed_runs = len([r for r in (*p.runs, *p.reserve) if r.config.seed == 1])
    per_seed_gpu_h = sum(r.gpu_hours or 0.0 for r in (*p.runs, *p.reserve) if r.config.seed == 1)
    rng = random.Random(14)
    if args.spreads_from is None:
        lo, hi = SPREAD_POINTS
        spreads = {c: math.exp(rng.uniform(math.log(lo), math.log(hi))) for c in cells}
        source = f"per-cell paired seed SD {lo:g}-{hi:g} points (log-uniform)"
    else:
        demo = measured_spreads(args.spreads_from, model_average)
        if all(c in demo for c in cells):  # the demo world: each cell its own
            spreads = {c: demo[c] for c in cells}
            source = f"per-cell paired seed SD measured in {args.spreads_from} (each cell its own)"
        else:  # another grid: its cells draw from the demo's measured spreads
            pool = [demo[c] for c in sorted(demo)]
            spreads = {c: rng.choice(pool) for c in cells}
            source = f"per-cell paired seed SD drawn from the {len(pool)} measured in {args.spreads_from}"
        values = sorted(demo.values())
        print(f"measured paired seed SD over {len(values)} demo {units}: min {values[0]:.2f},"
              f" median {statistics.median(values):.2f}, max {values[-1]:.2f} points")

    totals = {"adaptive_runs": 0.0, "adaptive_gpu_h": 0.0, "fixed_runs": 0.0, "fixed_gpu_h": 0.0}
    reached = at_max = 0
    fixed_seeds: list[int] = []
    for _ in range(args.experiments):
        results, diffs = simulate(spec, p, spreads, rng)
        extended = replicated(spec, p, results)
        states = replication_cells(spec, extended, results)
        reached += sum(1 for c in states if c.state == "reached")
        at_max += sum(1 for c in states if c.state == "stoppedAtMaxSeeds")
        worst = max(c.half_width or math.inf for c in states)
        totals["adaptive_runs"] += len(extended.runs)
        totals["adaptive_gpu_h"] += extended.gpu_hours
        # the fewest fixed seeds (up to 50) whose worst cell is as precise, on the same draws
        n = rep.min_seeds
        more = {c: v + [rng.gauss(MEAN_GAIN_POINTS, spreads[c]) for _ in range(50 - len(v))] for c, v in diffs.items()}
        while n < 50 and worst_half_width(more, n) > worst:
            n += 1
        fixed_seeds.append(n)
        totals["fixed_runs"] += n * per_seed_runs
        totals["fixed_gpu_h"] += n * per_seed_gpu_h
    k = args.experiments
    print(f"{args.spec}: {len(cells)} {units}; replication to ±{rep.target_half_width:g} points,"
          f" seeds {rep.min_seeds}..{rep.max_seeds}; {k} simulated experiments; {source}")
    print(f"  cells that reached the target: {reached / k:.1f}, stopped at maxSeeds: {at_max / k:.1f}"
          " (mean per experiment)")
    print(f"  precision-driven: {totals['adaptive_runs'] / k:.1f} runs, {totals['adaptive_gpu_h'] / k:,.3g} GPU-hours")
    print(f"  fixed seeds (same worst-case precision): {sum(fixed_seeds) / k:.1f} seeds on average,"
          f" {totals['fixed_runs'] / k:.1f} runs, {totals['fixed_gpu_h'] / k:,.3g} GPU-hours")
    print(f"  ratio runs: {totals['adaptive_runs'] / totals['fixed_runs']:.2f}x,"
          f" GPU-hours: {totals['adaptive_gpu_h'] / totals['fixed_gpu_h']:.2f}x")
    measured = {} if args.spreads_from is None else measured_differences(args.spreads_from, model_average)
    if args.spreads_from is not None and all(c in spreads for c in measured):
        real(spec, p, args.spreads_from, spreads, per_seed_runs)


def real(spec: ExperimentSpec, p: Plan, out_dir: Path, spreads: dict[Cell, float], per_seed_runs: int) -> None:
    """The finished run itself: the runs it took, against the fixed seed count whose every cell,
    at its measured spread, is as precise as the run's worst cell."""
    diffs = measured_differences(out_dir, spec.replication is not None and spec.replication.unit == "modelAverage")
    taken = {path.parent.name for path in out_dir.glob("runs/*/result.json")}
    runs = len([r for r in (*p.runs, *p.reserve) if r.run_id in taken])
    seeds = {cell: len(d) for cell, d in diffs.items()}
    widths = [gain_interval(d, dict.fromkeys(d, 0.0)) for d in diffs.values()]
    worst = max(math.inf if w is None or w.half_width is None else w.half_width for w in widths)
    n = fixed_seeds_for(spreads, worst)
    counts = ", ".join(f"{k} seeds: {sum(1 for v in seeds.values() if v == k)} cells"
                       for k in sorted(set(seeds.values())))
    print(f"  the real run in {out_dir}: {runs} runs ({counts}); worst cell ±{worst:.2f} points;"
          f" a fixed seed count reaching that in every cell at its measured SD: {n} seeds, {n * per_seed_runs} runs;"
          f" ratio runs {runs / (n * per_seed_runs):.2f}x")


if __name__ == "__main__":
    main()
