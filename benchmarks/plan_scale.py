"""Planning at scale: a spec that expands to 10,000 runs, timed.

Baseline (named, same run): building the same number of RunConfigs alone, with no DAG,
overrides or estimates. The ratio shows what planning costs on top of constructing configs.
Goal: the whole plan of 10,000 runs in under 2 s.

    python benchmarks/plan_scale.py [--runs 10000]
"""

from __future__ import annotations

import argparse
import time

from xstilts.operator.plan import plan
from xstilts.operator.spec import ExperimentSpec, parse_document
from xstilts.trainer.config import RunConfig, Stage
from xstilts.trainer.tasks import INTERMEDIATE_TASKS


def spec_with_runs(target_runs: int) -> ExperimentSpec:
    """models × 9 intermediate arms + 1 group × 2 targets × seeds ≈ target_runs."""
    per_model_seed = len(INTERMEDIATE_TASKS) + 1 + (len(INTERMEDIATE_TASKS) + 2) * 2  # phase 2 + phase 3
    models = 10
    seeds = max(1, round(target_runs / (models * per_model_seed)))
    return parse_document({
        "name": "scale",
        "models": [{"name": f"m{i}", "pretrained": f"org/model-{i}", "parameters": 10**8 * (i + 1),
                    "resources": {"gpus": 1 + i % 8}} for i in range(models)],
        "intermediateTasks": list(INTERMEDIATE_TASKS),
        "multiTaskGroups": [{"name": "all", "tasks": list(INTERMEDIATE_TASKS)}],
        "targets": ["xnli", "pawsx"],
        "seeds": list(range(seeds)),
        "planning": {"maxRuns": 1_000_000},
    })


def best_of(repeats: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = spec_with_runs(args.runs)
    result = plan(spec)
    n = len(result.runs)

    def baseline() -> None:
        for run in result.runs:
            c = run.config
            RunConfig(model=c.model, stage=Stage(c.stage), tasks=c.tasks, seed=c.seed).run_id  # noqa: B018

    t_plan = best_of(args.repeats, lambda: plan(spec))
    t_base = best_of(args.repeats, baseline)
    print(f"runs planned:            {n}")
    print(f"plan:                    {t_plan:.3f} s  ({n / t_plan:,.0f} runs/s)")
    print(f"baseline (bare configs): {t_base:.3f} s  ({n / t_base:,.0f} runs/s)")
    print(f"ratio plan / baseline:   {t_plan / t_base:.2f}x")
    print(f"goal < 2 s for 10,000 runs: {'met' if t_plan * 10_000 / n < 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
