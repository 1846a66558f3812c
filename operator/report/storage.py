"""The report's I/O, kept thin: result records from the result files under a storage root (the
record of what happened) or from MLflow (the view, e.g. for runs a cluster trained), and
the report's files written to disk and logged to the experiment's MLflow parent run."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xstilts.operator.experiment.plan import Plan
from xstilts.operator.report.build import Figure, Outcomes, Report, to_html, to_markdown
from xstilts.trainer.config import RunResult
from xstilts.trainer.rundir import ResultMissing, ResultProblem, RunDir, read_result, write_atomic
from xstilts.trainer.tracking.buffer import RUN_ID_TAG, redact_uri
from xstilts.trainer.tracking.mlflow_client import first_line, open_client

REPORT_DIR = "report"
REPORT_FORMATS = ("md", "html", "png", "json")
MLFLOW_REPORT_PATH = "report"


@dataclass
class Loaded:
    results: list[RunResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # unreadable records, one line each
    # run id -> per-example outcomes, from the predictions.parquet beside each result record
    predictions: dict[str, Outcomes] = field(default_factory=dict)


def _read(path: Path, loaded: Loaded, where: str | None = None) -> None:
    """One result record into `loaded`, with the predictions beside it, or a line saying why
    it is skipped (`where` names a downloaded copy by its origin).

    The predictions are read beside the record where it was found, not at the run directory
    its config names: that is where the pod wrote it (e.g. /data/...), which this machine may
    see under another path (the runs volume mounted elsewhere, or a copy from MLflow)."""
    try:
        result = read_result(path)
    except ResultMissing:
        return
    except ResultProblem as e:
        loaded.problems.append(f"{where or e.path}: {e.what}; skipped")
        return
    loaded.results.append(result)
    outcomes = read_predictions(path.parent / RunDir.PREDICTIONS)
    if outcomes is not None:
        loaded.predictions[result.run_id] = outcomes


def load_result_files(p: Plan) -> Loaded:
    """The result.json of every planned run that has one. Results of runs the spec no longer
    plans (an edited spec) are left out: the report is about this spec. The reserve's runs
    count too: under spec.replication, the seeds reconcile added live there."""
    loaded = Loaded()
    for run in (*p.runs, *p.reserve):
        _read(RunDir.of(run.config).result, loaded)
    return loaded


def read_predictions(path: Path) -> Outcomes | None:
    """A target run's predictions.parquet (per language: example -> (score, weight)); None
    where there is none (or pyarrow, from the [train] extra, is not installed)."""
    if not path.is_file():
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    by_language: dict[str, dict[int, tuple[float, float]]] = {}
    columns = pq.read_table(path, columns=["language", "example", "score", "weight"]).to_pydict()
    for lang, example, score, weight in zip(columns["language"], columns["example"], columns["score"],
                                            columns["weight"], strict=True):
        by_language.setdefault(lang, {})[example] = (score, weight)
    return by_language


def load_mlflow_results(tracking_uri: str, experiment_name: str, run_ids: Iterable[str]) -> Loaded:
    """Result records from MLflow: each training run logs its result.json as an artifact of
    its run, tagged with the xstilts run id. The newest MLflow run per xstilts run counts."""
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per record otherwise
    client = open_client(tracking_uri)
    loaded = Loaded()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        loaded.problems.append(f"MLflow at {redact_uri(tracking_uri)} has no experiment {experiment_name!r}")
        return loaded
    wanted = set(run_ids)
    newest: dict[str, str] = {}
    page_token = None
    while True:
        page = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` != ''",
                                  order_by=["attributes.start_time ASC"], max_results=1000, page_token=page_token)
        for mlflow_run in page:
            run_id = mlflow_run.data.tags.get(RUN_ID_TAG)
            if run_id in wanted and mlflow_run.info.status == "FINISHED":
                newest[run_id] = mlflow_run.info.run_id
        page_token = page.token
        if not page_token:
            break
    with tempfile.TemporaryDirectory() as tmp:
        for run_id, mlflow_run_id in sorted(newest.items()):
            try:
                local = client.download_artifacts(mlflow_run_id, RunDir.RESULT, os.path.join(tmp, run_id))
            except (MlflowException, OSError) as e:
                loaded.problems.append(f"MLflow run {mlflow_run_id} (xstilts run {run_id}): no {RunDir.RESULT}"
                                       f" ({first_line(e, tracking_uri)})")
                continue
            with contextlib.suppress(MlflowException, OSError):  # a phase-2 run has none
                client.download_artifacts(mlflow_run_id, RunDir.PREDICTIONS, os.path.join(tmp, run_id))
            _read(Path(local), loaded, f"MLflow run {mlflow_run_id}")
    return loaded


def write_report(report: Report, figures: Sequence[Figure], out_dir: Path, formats: Iterable[str]) -> list[Path]:
    """report.md (figures beside it), report.html (figures inlined), the PNGs, report.json."""
    formats = set(formats)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(name: str, data: str | bytes) -> None:
        write_atomic(out_dir / name, data)
        written.append(out_dir / name)

    if "png" in formats:
        for fig in figures:
            write(fig.file_name, fig.png)
    if "md" in formats:
        write("report.md", to_markdown(report, figures if "png" in formats else ()))
    if "html" in formats:
        write("report.html", to_html(report, figures))
    if "json" in formats:
        write("report.json", json.dumps(report_record(report), indent=2))
    return written


def report_record(report: Report) -> dict[str, object]:
    """The report's numbers, for machines: every gain cell with its interval."""
    return {
        "experiment": report.grid.experiment,
        "parameters": dict(report.parameters),
        "gains": [
            {"model": c.model, "intermediate": c.arm, "target": c.target, "language": c.language,
             "mean": c.gain.mean, "half_width": c.gain.half_width, "n": c.gain.n, "method": c.gain.method.value}
            for c in report.cells
        ],
        "model_averages": [
            {"model": m, "intermediate": a, "mean": g.mean, "half_width": g.half_width, "n": g.n,
             "method": g.method.value}
            for (m, a), g in report.model_averages.items()
        ],
        "model_averages_all_languages": [
            {"model": m, "intermediate": a, "mean": g.mean, "half_width": g.half_width, "n": g.n,
             "method": g.method.value}
            for (m, a), g in report.model_averages_all.items()
        ],
        "best": [{"model": b.model, "intermediate": b.arm, "mean": b.gain.mean,
                  "excludes_zero": b.gain.excludes_zero} for b in report.best],
        "trends": [
            {"intermediate": a, "target": t, "slope": tr.slope, "low": tr.low, "high": tr.high,
             "intercept": tr.intercept, "verdict": tr.verdict.value, "excludes_zero": tr.excludes_zero,
             "seeds_per_model": list(tr.seeds)}
            for (a, t), tr in report.trends.items()
        ],
        "missing": list(report.missing),
        "learning_rate_search": [
            {"stage": c.stage.value, "model": c.model, "intermediate": c.arm, "target": c.target,
             "selected": c.selected, "english_dev": {f"{lr:g}": v for lr, v in c.dev.items()}}
            for c in report.search
        ],
    }


def log_report(paths: Sequence[Path], tracking_uri: str, parent_run_id: str, report: Report | None = None) -> None:
    """The report's files as artifacts of the experiment's parent run, under report/; with
    `report`, also its gains and trends as metrics of that run and as a table artifact
    (report/gains.json), so that the UI can compare two experiments' parent runs."""
    client = open_client(tracking_uri)
    for path in paths:
        client.log_artifact(parent_run_id, str(path), MLFLOW_REPORT_PATH)
    if report is None:
        return
    from mlflow.entities import Metric
    from xstilts.trainer.tracking.buffer import now_ms

    at = now_ms()
    metrics = [Metric(k, v, at, 0) for k, v in parent_metrics(report).items()]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(parent_run_id, metrics=metrics[start:start + 1000])
    client.log_table(parent_run_id, gain_table(report), f"{MLFLOW_REPORT_PATH}/gains.json")


def _metric_key(*parts: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces
    return ".".join(p.replace(" ", "_") for p in parts)


def parent_metrics(report: Report) -> dict[str, float]:
    """gain.<model>.<arm>.zero_shot / .all (and _low/_high), trend.<arm>.<target>.slope/_low/_high,
    search.<stage>.<model>.<arm>[.<target>].learning_rate (the selected rate) and .dev.<rate>."""
    out: dict[str, float] = {}
    for (model, arm), g in report.model_averages.items():
        out[_metric_key("gain", model, arm, "zero_shot")] = g.mean
        if g.low is not None and g.high is not None:
            out[_metric_key("gain", model, arm, "zero_shot_low")] = g.low
            out[_metric_key("gain", model, arm, "zero_shot_high")] = g.high
    for (model, arm), g in report.model_averages_all.items():
        out[_metric_key("gain", model, arm, "all")] = g.mean
    for c in report.search:  # the selected rate, and each candidate's English dev score
        cell = (c.stage.value, c.model, c.arm, *((c.target,) if c.target else ()))
        if c.selected is not None:
            out[_metric_key("search", *cell, "learning_rate")] = c.selected
        for lr, v in c.dev.items():
            out[_metric_key("search", *cell, "dev", f"{lr:g}")] = v
    for (arm, target), t in report.trends.items():
        out[_metric_key("trend", arm, target, "slope")] = t.slope
        out[_metric_key("trend", arm, target, "slope_low")] = t.low
        out[_metric_key("trend", arm, target, "slope_high")] = t.high
    return out


def gain_table(report: Report) -> dict[str, list[object]]:
    """Every gain cell as columns (MLflow's table artifact)."""
    columns: dict[str, list[object]] = {k: [] for k in
                                        ("model", "intermediate", "target", "language", "gain", "low", "high", "n")}
    for c in report.cells:
        for key, value in (("model", c.model), ("intermediate", c.arm), ("target", c.target),
                           ("language", c.language), ("gain", c.gain.mean), ("low", c.gain.low),
                           ("high", c.gain.high), ("n", c.gain.n)):
            columns[key].append(value)
    return columns
