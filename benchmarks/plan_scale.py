"""Planning at scale: a spec that expands to 10,000 runs, timed.

Baseline (named, same run): building the same number of RunConfigs alone, with no DAG,
overrides or estimates. The ratio shows what planning costs on top of constructing configs.

Then what the controller does with that plan on each resync: parse the observed Jobs
(`ObservedJob.from_k8s`) and reconcile, midway through the experiment (half the runs have
results and their finished Jobs are still listed, half of maxParallel Jobs run). Reconcile renders only
the runs it creates. Its baseline is a bare pass over the plan with one dict lookup per run.

Rendering every run's objects (`render_experiment`: ConfigMap, [Service], Job) is timed too;
its baseline is the RunConfig JSON alone (`to_json` of each run, which the ConfigMaps hold).
Goal (issue 8): plan + render all + parse + reconcile of 10,000 runs in under 2 s.

    python benchmarks/plan_scale.py [--runs 10000]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from xstilts.operator.cluster.reconcile import Observed, ObservedJob, ResultSummary, reconcile
from xstilts.operator.cluster.render import render_experiment, render_run
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import MAX_RUNS, ExperimentSpec, parse_document
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
        "data": {"ccg": "/data/ccgbank"},  # CCG has no hub source: its corpus is licensed
        "planning": {"maxRuns": MAX_RUNS},
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
    reconcile_timings(spec, result, t_plan, args.repeats)


def midway(spec: ExperimentSpec, p: Plan) -> tuple[list[dict], dict[str, ResultSummary]]:
    """Half the runs done (results written, Jobs not yet deleted by their TTL), half of
    maxParallel running (so reconcile creates the other half): the Job objects as the API
    lists them, and the results."""
    half = len(p.runs) // 2
    done, running = p.runs[:half], p.runs[half:half + spec.cluster.max_parallel // 2]
    jobs = []
    for run, phase in [*((r, "Complete") for r in done), *((r, None) for r in running)]:
        job = render_run(run, spec)[-1]
        job["status"] = ({"succeeded": 1, "conditions": [{"type": phase, "status": "True"}]} if phase
                         else {"active": 1, "ready": 1, "startTime": "2025-01-01T00:00:00Z"})
        jobs.append(job)
    # Scores differ from run to run, as real ones do, so that no two gains are alike.
    return jobs, {r.run_id: ResultSummary(r.run_id, {"avg": 0.5 + (i % 997) / 10_000}) for i, r in enumerate(done)}


def reconcile_timings(spec: ExperimentSpec, p: Plan, t_plan: float, repeats: int) -> None:
    n = len(p.runs)
    now = datetime(2025, 1, 2, tzinfo=UTC)
    job_objects, results = midway(spec, p)
    observed_jobs = [ObservedJob.from_k8s(j) for j in job_objects]
    observed = Observed(jobs=observed_jobs, results=results)

    def bare_pass() -> None:
        for run in p.runs:
            results.get(run.run_id)

    t_parse = best_of(repeats, lambda: [ObservedJob.from_k8s(j) for j in job_objects])
    t_fresh = best_of(repeats, lambda: reconcile(spec, p, Observed(), now))
    # The first reconcile that sees these results computes every gain; later ones reuse them.
    t_mid = best_of(1, lambda: reconcile(spec, p, observed, now))
    t_again = best_of(repeats, lambda: reconcile(spec, p, observed, now))
    t_bare = best_of(repeats, bare_pass)
    t_render = best_of(repeats, lambda: render_experiment(p, spec))
    t_json = best_of(repeats, lambda: [run.config.to_json() for run in p.runs])
    created = len(reconcile(spec, p, observed, now).creates)
    total = t_plan + t_render + t_parse + t_mid
    print(f"parse {len(job_objects)} Jobs:          {t_parse:.3f} s")
    print(f"reconcile, fresh:        {t_fresh:.3f} s")
    print(f"reconcile, midway:       {t_mid:.3f} s  ({created} runs rendered and created)")
    print(f"  again, same results:   {t_again:.3f} s")
    print(f"baseline (bare pass):    {t_bare:.4f} s")
    print(f"ratio reconcile / bare:  {t_mid / t_bare:.0f}x")
    print(f"render all {n} runs:   {t_render:.3f} s  ({n / t_render:,.0f} runs/s)")
    print(f"baseline (config JSON):  {t_json:.3f} s")
    print(f"ratio render / JSON:     {t_render / t_json:.2f}x")
    print(f"plan + render all + parse + reconcile: {total:.3f} s"
          f"  (plan {t_plan:.3f} + render {t_render:.3f} + parse {t_parse:.3f} + reconcile {t_mid:.3f})")
    print(f"goal < 2 s for 10,000 runs: {'met' if total * 10_000 / n < 2 else 'NOT met'}"
          f"  ({total * 10_000 / n:.3f} s scaled to 10,000 runs)")


if __name__ == "__main__":
    main()
