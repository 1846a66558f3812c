"""`xstilts validate`, `plan` and `crd`: what a spec means, before anything runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape
from rich.table import Table
from xstilts.operator.cli.common import SpecPath, console, fail, load_spec
from xstilts.operator.cluster.crd import crd as make_crd
from xstilts.operator.experiment.plan import Plan, PlannedRun, plan, search_cost
from xstilts.operator.experiment.spec import ExperimentSpec
from xstilts.trainer.config import ExitCode


def validate(specs: Annotated[list[Path], typer.Argument(help="One or more spec files.")]) -> None:
    """Check specs; print every problem with its field path. Exit 0 if all are valid, else 2."""
    failed = False
    for path in specs:
        try:
            spec = load_spec(path)
        except typer.Exit:
            failed = True
            continue
        console.print(f"[green]ok[/green] {escape(str(path))}: {escape(spec.name)}, {spec.run_count} runs")
    if failed:
        raise typer.Exit(ExitCode.INVALID_INPUT)


def _fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "?"
    return f"{hours:,.1f}" if hours >= 0.1 else f"{hours:.3f}"


def plan_rows(p: Plan) -> list[dict[str, Any]]:
    return [
        {
            "run_id": r.run_id,
            "stage": r.config.stage.value,
            "model": r.labels.model,
            "intermediate": r.labels.intermediate,
            "target": r.labels.target,
            "tasks": list(r.config.tasks),
            "seed": r.config.seed,
            "learning_rate": r.config.hyperparameters.learning_rate,
            "depends_on": list(r.depends_on),
            "train_tokens": r.train_tokens,
            "gpu_hours": r.gpu_hours,
            "gpus": r.config.resources.gpus_per_node * r.config.resources.nodes,
            "zero_stage": r.config.deepspeed.zero_stage,
            "offload": r.config.deepspeed.offload,
            # an intermediate arm's variant (mlm, translate-train), only on its runs
            **({"variant": r.labels.variant} if r.labels.variant else {}),
        }
        for r in p.runs
    ]


def plan_command(
    spec_path: SpecPath,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    configs: Annotated[bool, typer.Option(help="With --output json: include each run's full RunConfig.")] = False,
) -> None:
    """Show the runs a spec expands to, their dependencies and GPU-hour estimates."""
    if output not in ("table", "json"):
        fail(f"--output must be 'table' or 'json', not {output!r}", ExitCode.INVALID_INPUT)
    spec = load_spec(spec_path)
    p = plan(spec)
    if output == "json":
        rows = plan_rows(p)
        if configs:
            for row, run in zip(rows, p.runs, strict=True):
                row["config"] = run.config.model_dump(mode="json")
        doc = {
            "experiment": spec.name,
            "runs": rows,
            "totals": _totals(p, spec),
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    _print_plan_table(spec, p)


def _totals(p: Plan, spec: ExperimentSpec) -> dict[str, Any]:
    from xstilts.trainer.config import Stage

    cost = search_cost(spec, p)

    return {
        "runs": len(p.runs),
        "intermediate_runs": p.count(Stage.INTERMEDIATE),
        "target_runs": p.count(Stage.TARGET),
        "gpu_hours": p.gpu_hours,
        "unknown_gpu_hours": sum(1 for r in p.runs if r.gpu_hours is None),
        "held_runs": len(p.held),
        **({"search": {"runs": cost.runs, "gpu_hours": cost.gpu_hours, "runs_without": cost.runs_without,
                       "gpu_hours_without": cost.gpu_hours_without}} if cost is not None else {}),
        # With spec.replication: every cell at maxSeeds (the runs above are the minSeeds ones).
        "max_runs": len(p.runs) + len(p.reserve),
        "max_gpu_hours": p.gpu_hours + sum(r.gpu_hours or 0.0 for r in p.reserve),
    }


def _print_plan_table(spec: ExperimentSpec, p: Plan) -> None:
    table = Table(title=f"{escape(spec.name)}: {len(p.runs)} runs", show_lines=False)
    for column in ("run", "stage", "model", "intermediate", "target", "seed", "after", "GPUs", "ZeRO", "GPU-h"):
        table.add_column(column, justify="right" if column in ("seed", "GPUs", "GPU-h") else "left")

    def row(r: PlannedRun) -> list[str]:
        ds = r.config.deepspeed
        zero = f"{ds.zero_stage}" + ("" if ds.offload == "none" else f"+{ds.offload}")
        res = r.config.resources
        gpus = f"{res.gpus_per_node}x{res.nodes}" if res.nodes > 1 else str(res.gpus_per_node)
        return [r.run_id, r.config.stage.value, r.labels.model, r.labels.intermediate,
                r.labels.target or "-", str(r.config.seed), ",".join(r.depends_on) or "-",
                gpus, zero, _fmt_hours(r.gpu_hours)]

    for r in p.runs:
        table.add_row(*row(r))
    console.print(table)
    t = _totals(p, spec)
    unknown = f" ({t['unknown_gpu_hours']} runs of unknown size not counted)" if t["unknown_gpu_hours"] else ""
    console.print(
        f"[bold]{t['runs']}[/bold] runs: {t['intermediate_runs']} intermediate, {t['target_runs']} target;"
        f" estimated [bold]{_fmt_hours(t['gpu_hours'])}[/bold] GPU-hours at"
        f" {spec.planning.assumed_tflops_per_gpu:g} TFLOP/s per GPU{unknown}"
    )
    cost = search_cost(spec, p)
    if cost is not None:
        hp = spec.hyperparameters
        stages = "; ".join(f"{stage} {', '.join(f'{lr:g}' for lr in getattr(hp, stage).learning_rates)}"
                           for stage in ("intermediate", "target") if getattr(hp, stage).search is not None)
        held = (f" ({len(p.held)} target runs wait for the phase-2 selection; those of the selected rate run)"
                if p.held else "")
        console.print(
            f"learning-rate search ({stages}): [bold]{cost.runs}[/bold] runs, [bold]{_fmt_hours(cost.gpu_hours)}"
            f"[/bold] GPU-hours{held}; without the search {cost.runs_without} runs,"
            f" {_fmt_hours(cost.gpu_hours_without)} GPU-hours")
    if spec.replication is not None:
        rep = spec.replication
        unit = "model × arm (over the targets)" if rep.unit == "modelAverage" else "cell"
        console.print(
            f"replication to ±{rep.target_half_width:g} points per {unit}: at least [bold]{t['runs']}[/bold] runs,"
            f" {_fmt_hours(t['gpu_hours'])} GPU-hours (every one stops at {rep.min_seeds} seeds); at most"
            f" [bold]{t['max_runs']}[/bold] runs, {_fmt_hours(t['max_gpu_hours'])} GPU-hours (every one"
            f" needs {rep.max_seeds} seeds)")


def crd() -> None:
    """Print the Experiment CustomResourceDefinition (generated from the spec model)."""
    sys.stdout.write(yaml.safe_dump(make_crd(), sort_keys=False, width=100, allow_unicode=True))


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command("plan")(plan_command)
    app.command()(crd)
