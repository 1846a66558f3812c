"""The scaling report over hand-made result records: gains and intervals checked against
numbers worked out by hand, missing cells named, and the Markdown, HTML and PNG files written,
readable, and logged to the experiment's MLflow parent run (a real SQLite MLflow store)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import socket
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import ExperimentSpec, load_spec_text
from xstilts.operator.report.build import (
    AVG,
    ZERO_SHOT,
    build_report,
    fmt_interval,
    grid_of,
    tables,
    to_html,
    to_markdown,
)
from xstilts.operator.report.plots import gain_vs_size
from xstilts.operator.report.stats import Method
from xstilts.trainer.config import RunResult, Stage
from xstilts.trainer.rundir import RunDir

SPEC = """
name: report-test
models:
  - {name: small, pretrained: local/small, parameters: 1000000, resources: {gpus: 0}}
  - {name: mid, pretrained: local/mid, parameters: 2000000, resources: {gpus: 0}}
  - {name: big, pretrained: local/big, parameters: 4000000, resources: {gpus: 0}}
intermediateTasks: [mnli]
targets: [pawsx]
evalLanguages: {pawsx: [en, de]}
seeds: [1, 2, 3]
"""

# Accuracies (fractions) by (model, arm, seed) for en, de. The report speaks in points (×100).
SCORES: dict[tuple[str, str, int], tuple[float, float]] = {
    ("small", "baseline", 1): (0.60, 0.50), ("small", "baseline", 2): (0.62, 0.52),
    ("small", "baseline", 3): (0.64, 0.51),
    ("small", "mnli", 1): (0.63, 0.55), ("small", "mnli", 2): (0.66, 0.55), ("small", "mnli", 3): (0.65, 0.56),
    # big: baseline lacks seed 3, mnli lacks seed 1 → one seed pair only → Welch
    ("big", "baseline", 1): (0.70, 0.60), ("big", "baseline", 2): (0.72, 0.64),
    ("big", "mnli", 2): (0.80, 0.70), ("big", "mnli", 3): (0.78, 0.74),
    # mid: no baseline at all → no gain
    ("mid", "mnli", 1): (0.66, 0.60),
}


def the_spec() -> ExperimentSpec:
    return load_spec_text(SPEC, "report-test.yaml")


def target_run(p: Plan, model: str, arm: str, seed: int):  # type: ignore[no-untyped-def]
    return next(r for r in p.runs if r.config.stage is Stage.TARGET and r.labels.model == model
                and r.labels.intermediate == arm and r.config.seed == seed)


def make_result(p: Plan, model: str, arm: str, seed: int, en: float, de: float | None,
                parameters: int = 0) -> RunResult:
    run = target_run(p, model, arm, seed)
    languages = {"en": {"accuracy": en}} | ({"de": {"accuracy": de}} if de is not None else {})
    return RunResult(
        run_id=run.run_id, config=run.config,
        metrics={"dev.accuracy": en, **{f"pawsx.test.accuracy.{k}": v["accuracy"] for k, v in languages.items()}},
        languages=languages, parameter_count=parameters or (run.labels.model_parameters or 0) + 1234,
        tokens_seen=1000, train_steps=10, wall_seconds=1.0, tokens_per_second=1000.0,
        finished_at="2025-01-01T00:00:00+00:00",
    )


def hand_made_results(p: Plan) -> list[RunResult]:
    return [make_result(p, m, a, s, en, de) for (m, a, s), (en, de) in SCORES.items()]


def test_gains_and_intervals_match_the_hand_computation() -> None:
    spec = the_spec()
    report = build_report(hand_made_results(plan(spec)), grid_of(spec))

    # small, paired over seeds 1-3. en gains 3, 4, 1 → mean 8/3, half-width
    # t(0.975, 2)·sd/√3 = 4.302653 · 1.527525 / 1.732051 = 3.794583
    en = report.cell("small", "mnli", "pawsx", "en")
    assert en is not None and en.gain.method is Method.PAIRED and en.gain.n == 3
    assert en.gain.mean == pytest.approx(8 / 3)
    assert en.gain.half_width == pytest.approx(3.794583, abs=1e-5)
    # de gains 5, 3, 5 → mean 13/3, sd 1.154701 → half-width 2.868435
    de = report.cell("small", "mnli", "pawsx", "de")
    assert de is not None
    assert de.gain.mean == pytest.approx(13 / 3)
    assert de.gain.half_width == pytest.approx(2.868435, abs=1e-5)
    # language average per seed: baseline 55, 57, 57.5; mnli 59, 60.5, 60.5 → gains 4, 3.5, 3
    # → mean 3.5, sd 0.5, half-width 4.302653 · 0.5 / √3 = 1.242069
    avg = report.cell("small", "mnli", "pawsx", AVG)
    assert avg is not None
    assert avg.gain.mean == pytest.approx(3.5)
    assert avg.gain.half_width == pytest.approx(1.242069, abs=1e-5)

    # big: only seed 2 has both runs → Welch. en: (80 + 78)/2 − (70 + 72)/2 = 8, se √2, df 2
    # → half-width 4.302653 · 1.414214 = 6.084870
    big_en = report.cell("big", "mnli", "pawsx", "en")
    assert big_en is not None and big_en.gain.method is Method.WELCH
    assert big_en.gain.mean == pytest.approx(8.0)
    assert big_en.gain.half_width == pytest.approx(6.084870, abs=1e-5)
    # big avg: mnli 75, 76 vs baseline 65, 68 → 75.5 − 66.5 = 9
    big_avg = report.cell("big", "mnli", "pawsx", AVG)
    assert big_avg is not None and big_avg.gain.mean == pytest.approx(9.0)

    # mid has no baseline: no gain cell at all
    assert report.cell("mid", "mnli", "pawsx", "en") is None

    # absolute scores: small baseline en over seeds = (60 + 62 + 64) / 3 = 62
    assert report.scores[("small", "baseline", "pawsx", "en")].mean == pytest.approx(62.0)

    # zero-shot average: de alone here. small: gains 5, 3, 5 → 13/3; big (Welch): 72 − 62 = 10
    zs = report.cell("small", "mnli", "pawsx", ZERO_SHOT)
    assert zs is not None and zs.gain.mean == pytest.approx(13 / 3)
    # per-model average over targets (one target here): zero-shot is the headline, all languages beside it
    assert report.model_averages[("small", "mnli")].mean == pytest.approx(13 / 3)
    assert report.model_averages[("big", "mnli")].mean == pytest.approx(10.0)
    assert report.model_averages_all[("small", "mnli")].mean == pytest.approx(3.5)
    assert report.model_averages_all[("big", "mnli")].mean == pytest.approx(9.0)
    assert ("mid", "mnli") not in report.model_averages
    assert [(b.model, b.arm) for b in report.best] == [("small", "mnli"), ("big", "mnli")]

    # parameters as the trainer counted them (spec count + 1234 in these records)
    assert report.parameters["small"] == 1_001_234
    assert report.parameters["mid"] == 2_001_234


def test_missing_cells_are_named() -> None:
    spec = the_spec()
    report = build_report(hand_made_results(plan(spec)), grid_of(spec))
    assert set(report.missing) == {
        "mid · baseline → pawsx: no result for seeds 1, 2, 3",
        "mid · mnli → pawsx: no result for seeds 2, 3",
        "mid · mnli → pawsx: no gain, it lacks baseline results",
        "big · baseline → pawsx: no result for seed 3",
        "big · mnli → pawsx: no result for seed 1",
    }
    assert not report.complete


def test_a_result_without_a_language_counts_for_the_others_only() -> None:
    spec = the_spec()
    p = plan(spec)
    results = [make_result(p, "small", "baseline", 1, 0.60, 0.50), make_result(p, "small", "baseline", 2, 0.62, 0.52),
               make_result(p, "small", "mnli", 1, 0.63, None), make_result(p, "small", "mnli", 2, 0.66, 0.55)]
    report = build_report(results, grid_of(spec))
    assert "small · mnli → pawsx seed 1: no score for de" in report.missing
    # de: one seed pair (seed 2) and one treated value → a single difference, 55 − 52 = 3
    de = report.cell("small", "mnli", "pawsx", "de")
    assert de is not None and de.gain.method is Method.SINGLE and de.gain.mean == pytest.approx(3.0)
    # en is still paired over both seeds: gains 3, 4
    en = report.cell("small", "mnli", "pawsx", "en")
    assert en is not None and en.gain.method is Method.PAIRED and en.gain.mean == pytest.approx(3.5)


def test_an_empty_report_says_everything_is_missing() -> None:
    spec = the_spec()
    report = build_report([], grid_of(spec))
    assert report.cells == () and report.best == ()
    assert len([m for m in report.missing if "no gain" in m]) == 3
    text = to_markdown(report)
    assert "No model has both baseline and intermediate results yet." in text
    assert "## Missing" in text


def test_markdown_and_html_carry_the_numbers() -> None:
    spec = the_spec()
    report = build_report(hand_made_results(plan(spec)), grid_of(spec))
    md = to_markdown(report)
    best = next(t for t in tables(report) if t.title.startswith("Best"))
    assert best.rows[0] == ("small", "1M", "mnli", "+4.33 ± 2.87", "excludes 0")
    # en, de, zero-shot (de alone), avg
    assert "| small | mnli | +2.67 ± 3.79 | +4.33 ± 2.87 | +4.33 ± 2.87 | +3.50 ± 1.24 |" in md
    assert "| big | mnli | +8.00 ± 6.08† |" in md  # Welch cells are marked
    assert "Welch" in md  # ... and the mark explained
    assert "| mid | mnli | – | – | – | – |" in md
    # the answer comes first: a verdict per arm, then how it was computed
    assert md.index("## The answer") < md.index("## Best intermediate task")
    assert "- mnli: no detectable trend at this precision:" in md and "hierarchical bootstrap" in md
    assert "- big · mnli → pawsx: no result for seed 1" in md
    page = to_html(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert '<td class="pos">+3.50 ± 1.24</td>' in page
    assert "<li>mid · mnli → pawsx: no gain, it lacks baseline results</li>" in page


def write_results(p: Plan, results: list[RunResult]) -> None:
    for r in results:
        path = RunDir.of(p.by_id[r.run_id].config).result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(r.model_dump_json(), encoding="utf-8")


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes every pixel: a truncated file fails here
        return image.size


def test_the_size_plot_names_the_models_of_unknown_size_it_leaves_out() -> None:
    spec = the_spec()
    report = build_report(hand_made_results(plan(spec)), grid_of(spec))
    report = dataclasses.replace(report, parameters={**report.parameters, "big": None})
    figure = gain_vs_size(report)
    assert figure.caption.endswith("Not plotted (parameter count unknown): big.")
    width, height = png_size(figure.png)
    assert 300 <= width <= 4000 and 200 <= height <= 3000


def test_report_command_writes_files_and_logs_them_to_the_mlflow_parent_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "out"
    p = plan(the_spec(), str(out))
    write_results(p, hand_made_results(p))
    torn = target_run(p, "mid", "baseline", 1).config
    Path(torn.run_dir).mkdir(parents=True, exist_ok=True)
    RunDir.of(torn).result.write_text("{not json", encoding="utf-8")

    result = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(out),
                                      "--format", "md,html,png,json"])
    assert result.exit_code == 0, result.output
    assert "not a valid result record" in result.output  # the torn record is named, not fatal
    assert "small (1M): best mnli, zero-shot +4.33 ± 2.87 points, excludes 0" in result.output
    assert "mnli: no detectable trend at this precision" in result.output

    report_dir = out / "report"
    names = {f.name for f in report_dir.iterdir()}
    assert names == {"report.md", "report.html", "report.json", "gain_vs_size.png", "gain_by_language_pawsx.png"}
    for png in ("gain_vs_size.png", "gain_by_language_pawsx.png"):
        width, height = png_size((report_dir / png).read_bytes())
        assert 300 <= width <= 4000 and 200 <= height <= 3000
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "![" in md and "(gain_vs_size.png)" in md
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    inlined = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(inlined) == 2  # self-contained: both plots inside the page
    assert png_size(base64.b64decode(inlined[0]))[0] >= 300
    record = json.loads((report_dir / "report.json").read_text(encoding="utf-8"))
    small_avg = next(g for g in record["gains"] if g["model"] == "small" and g["language"] == AVG)
    assert small_avg["mean"] == pytest.approx(3.5) and small_avg["method"] == "paired t"

    client = MlflowClient(f"sqlite:///{(out / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("report-test")
    assert experiment is not None
    parents = client.search_runs([experiment.experiment_id], "tags.`xstilts.parent` = 'true'")
    assert len(parents) == 1
    logged = {Path(a.path).name: a.file_size for a in client.list_artifacts(parents[0].info.run_id, "report")}
    assert set(logged) == names | {"gains.json"}
    assert logged["gain_vs_size.png"] == (report_dir / "gain_vs_size.png").stat().st_size
    # the gains and the trend as metrics of the parent run, and the gain table as a table artifact
    parent = client.get_run(parents[0].info.run_id)
    assert parent.data.metrics["gain.small.mnli.zero_shot"] == pytest.approx(13 / 3)
    assert parent.data.metrics["gain.small.mnli.all"] == pytest.approx(3.5)
    assert "trend.mnli.pawsx.slope" in parent.data.metrics and "trend.mnli.all_targets.slope_low" in parent.data.metrics
    table = json.loads(Path(client.download_artifacts(parents[0].info.run_id, "report/gains.json", str(tmp_path)))
                       .read_text(encoding="utf-8"))
    assert "model" in table["columns"] and len(table["data"]) == len(record["gains"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # a second report goes to the same parent run
    again = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(out), "--format", "md"])
    assert again.exit_code == 0, again.output
    assert len(client.search_runs([experiment.experiment_id], "tags.`xstilts.parent` = 'true'")) == 1


def test_report_rejects_an_unknown_format(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC, encoding="utf-8")
    result = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(tmp_path), "--format", "md,pdf"])
    assert result.exit_code == 2
    assert "pdf is not a report format" in result.output
    assert not (tmp_path / "report").exists()


def test_report_from_an_mlflow_server_that_refuses_says_so_without_a_traceback(tmp_path: Path) -> None:
    """An MLflow server that answers 403 (e.g. its allowed-hosts check, reached by an address
    it does not list): one error line naming the server and its answer, exit 1."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"Invalid Host header - possible DNS rebinding attack detected"
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(SPEC, encoding="utf-8")
        uri = f"http://user:secret@127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(tmp_path), "--format", "json",
                                          "--from-mlflow", "--tracking-uri", uri])
    finally:
        server.shutdown()
    assert result.exit_code == 1, result.output
    assert "cannot read the results from MLflow at http://" in result.output
    assert "403" in result.output and "Traceback" not in result.output and "secret" not in result.output
    assert not (tmp_path / "report").exists()


def test_report_from_mlflow_equals_report_from_files(tmp_path: Path) -> None:
    """The trainer logs each result.json to its MLflow run (RunTracker, the real tracking code);
    --from-mlflow rebuilds the same report from MLflow alone."""
    from xstilts.operator.local.executor import with_tracking
    from xstilts.trainer.tracking.tracker import RunTracker, find_or_create_parent_run, local_tracking_uri

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "out"
    uri = local_tracking_uri(out)
    p = with_tracking(plan(the_spec(), str(out)), uri, find_or_create_parent_run(uri, "report-test", "report-test"))
    results = hand_made_results(p)
    write_results(p, results)
    for r in results:
        tracker = RunTracker(p.by_id[r.run_id].config)
        tracker.start()
        tracker.log_artifact(RunDir.of(p.by_id[r.run_id].config).result)
        tracker.finish()

    from_files = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(out), "--format", "json"])
    assert from_files.exit_code == 0, from_files.output
    expected = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    for r in results:  # MLflow is now the only source
        RunDir.of(p.by_id[r.run_id].config).result.unlink()
    from_mlflow = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(out), "--format", "json",
                                           "--from-mlflow"])
    assert from_mlflow.exit_code == 0, from_mlflow.output
    got = json.loads((out / "report" / "report.json").read_text(encoding="utf-8"))
    assert got == expected
    assert len(got["gains"]) == 8  # small and big × en, de, zero-shot, avg


def test_without_a_reachable_mlflow_the_report_is_still_written_and_no_password_is_printed(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC, encoding="utf-8")
    out = tmp_path / "out"
    p = plan(the_spec(), str(out))
    write_results(p, hand_made_results(p))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    secret = "planted-secret-0b5e"
    result = CliRunner().invoke(app, ["report", str(spec_path), "--output-dir", str(out), "--format", "md",
                                      "--tracking-uri", f"http://bot:{secret}@127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert (out / "report" / "report.md").exists()
    assert f"MLflow at http://127.0.0.1:{port} is not usable" in result.output
    assert secret not in result.output


def test_both_model_selection_protocols_side_by_side() -> None:
    spec = the_spec()
    p = plan(spec)
    results = []
    for r in hand_made_results(p):
        if r.config.labels is not None and r.config.labels.model == "small":
            # target-dev selection finds a checkpoint 1 point better in de for mnli, none for the baseline
            bump = 0.01 if r.config.labels.intermediate == "mnli" else 0.0
            oracle = {lang: {"accuracy": v["accuracy"] + (bump if lang == "de" else 0.0)}
                      for lang, v in r.languages.items()}
            r = r.model_copy(update={"oracle_languages": oracle})
        results.append(r)
    report = build_report(results, grid_of(spec))
    # small, zero-shot (de): English-dev 13/3; target-dev 13/3 + 1
    assert report.oracle_gains[("small", "mnli", "pawsx")].mean == pytest.approx(13 / 3 + 1)
    assert ("big", "mnli", "pawsx") not in report.oracle_gains  # big's runs have no target-dev scores
    table = next(t for t in tables(report) if t.title.startswith("Zero-shot gain under both"))
    assert table.rows[0] == ("small", "mnli", "pawsx", "+4.33 ± 2.87", "+5.33 ± 2.87")
    assert ("big", "mnli", "pawsx", "+10.00 ± 12.17†", "–") in table.rows


def test_under_replication_each_cell_says_whether_it_reached_the_target_precision() -> None:
    text = SPEC.replace("seeds: [1, 2, 3]", "replication: {targetHalfWidth: 5.0, minSeeds: 2, maxSeeds: 3}")
    spec = load_spec_text(text, "report-test.yaml")
    p = plan(spec)
    full = Plan(p.experiment, (*p.runs, *p.reserve), {r.run_id: r for r in (*p.runs, *p.reserve)})
    # small: three close paired gains (reached); big: gains of 0 and 20 points on seeds 1-3 (stopped at max)
    scores = {("small", "baseline"): [(0.60, 0.50), (0.62, 0.52), (0.64, 0.51)],
              ("small", "mnli"): [(0.63, 0.53), (0.65, 0.55), (0.67, 0.54)],
              ("big", "baseline"): [(0.70, 0.60), (0.70, 0.60), (0.70, 0.60)],
              ("big", "mnli"): [(0.70, 0.60), (0.90, 0.80), (0.70, 0.60)]}
    results = [make_result(full, m, a, s + 1, en, de) for (m, a), values in scores.items()
               for s, (en, de) in enumerate(values)]
    report = build_report(results, grid_of(spec))
    table = next(t for t in tables(report) if t.title.startswith("Replication"))
    marks = {(row[0], row[2]): row[-1] for row in table.rows}
    assert marks[("small", "pawsx")].startswith("reached ±")
    assert marks[("big", "pawsx")].startswith("stopped at max seeds, ±")
    assert "Replication" in to_markdown(report)


def test_under_model_average_replication_each_model_and_arm_says_where_its_average_stands() -> None:
    text = SPEC.replace("seeds: [1, 2, 3]",
                        "replication: {targetHalfWidth: 5.0, minSeeds: 2, maxSeeds: 3, unit: modelAverage}")
    spec = load_spec_text(text, "report-test.yaml")
    p = plan(spec)
    full = Plan(p.experiment, (*p.runs, *p.reserve), {r.run_id: r for r in (*p.runs, *p.reserve)})
    scores = {("small", "baseline"): [(0.60, 0.50), (0.62, 0.52), (0.64, 0.51)],
              ("small", "mnli"): [(0.63, 0.53), (0.65, 0.55), (0.67, 0.54)],
              ("big", "baseline"): [(0.70, 0.60), (0.70, 0.60), (0.70, 0.60)],
              ("big", "mnli"): [(0.70, 0.60), (0.90, 0.80), (0.70, 0.60)]}
    results = [make_result(full, m, a, s + 1, en, de) for (m, a), values in scores.items()
               for s, (en, de) in enumerate(values)]
    report = build_report(results, grid_of(spec))
    table = next(t for t in tables(report) if t.title.startswith("Replication"))
    rows = {(row[0], row[1]): row for row in table.rows}
    assert {row[2] for row in table.rows} == {"all targets"}
    assert rows[("small", "mnli")][-1].startswith("reached ±")
    assert rows[("big", "mnli")][-1].startswith("stopped at max seeds, ±")
    assert rows[("big", "mnli")][4] == fmt_interval(report.model_averages[("big", "mnli")])


def test_example_level_paired_bootstrap_per_language() -> None:
    import numpy as np

    spec = the_spec()
    results = hand_made_results(plan(spec))
    rng = np.random.default_rng(5)
    predictions = {}
    for r in results:
        labels = r.config.labels
        assert labels is not None
        if labels.model != "small":
            continue
        p_correct = 0.8 if labels.intermediate == "mnli" else 0.5
        de = {e: (float(rng.random() < p_correct), 1.0) for e in range(300)}
        en = {e: (1.0, 1.0) for e in range(300)}  # both arms right everywhere: no gain, no spread
        predictions[r.run_id] = {"de": de, "en": en}
    report = build_report(results, grid_of(spec), predictions)
    gain, low, high = report.example_gains[("small", "mnli", "pawsx", "de")]
    assert 20 < gain < 40 and low < 30 < high and low > 0
    assert report.example_gains[("small", "mnli", "pawsx", "en")] == (0.0, 0.0, 0.0)
    assert ("big", "mnli", "pawsx", "de") not in report.example_gains  # big kept no predictions
    # deterministic: the same predictions, the same interval
    assert build_report(results, grid_of(spec), predictions).example_gains == report.example_gains
    table = next(t for t in tables(report) if t.title.startswith("Example-level"))
    assert table.rows[0][:4] == ("small", "mnli", "pawsx", "en")
    assert table.rows[1][3] == "de" and table.rows[1][6] == "excludes 0"


def test_predictions_written_by_a_run_are_read_back_beside_its_result_wherever_the_volume_is(
        tmp_path: Path) -> None:
    """The pods wrote the runs under their mount path (the configs name it); this machine sees
    the volume elsewhere. The predictions are read beside each result.json that was read, and
    a run without a predictions file simply has none."""
    from xstilts.operator.report.storage import load_result_files
    from xstilts.trainer.train import write_predictions

    spec = the_spec()
    as_pods_saw_it = hand_made_results(plan(spec, "/data/somewhere"))
    mounted = plan(spec, str(tmp_path / "mounted"))
    write_results(mounted, as_pods_saw_it)
    first = as_pods_saw_it[0]
    records = [[{"example": 0, "prediction": "1", "gold": "1", "score": 1.0, "weight": 1.0},
                {"example": 1, "prediction": "0", "gold": "1", "score": 0.0, "weight": 1.0}],
               [{"example": 0, "prediction": "[1, 2]", "gold": "[1, 3]", "score": 1.0, "weight": 2.0}]]
    write_predictions(RunDir.of(mounted.by_id[first.run_id].config).predictions, ["en", "de"], records)
    loaded = load_result_files(mounted)
    assert len(loaded.results) == len(as_pods_saw_it) and not loaded.problems
    assert loaded.predictions == {first.run_id: {"en": {0: (1.0, 1.0), 1: (0.0, 1.0)}, "de": {0: (1.0, 2.0)}}}


def test_results_of_seeds_added_under_replication_are_read(tmp_path: Path) -> None:
    """Seeds reconcile added live in the plan's reserve; their results count in the report."""
    from xstilts.operator.report.storage import load_result_files

    text = SPEC.replace("seeds: [1, 2, 3]", "replication: {targetHalfWidth: 5.0, minSeeds: 2, maxSeeds: 3}")
    p = plan(load_spec_text(text, "report-test.yaml"), str(tmp_path))
    assert all(r.config.seed == 3 for r in p.reserve) and p.reserve
    full = Plan(p.experiment, (*p.runs, *p.reserve), {r.run_id: r for r in (*p.runs, *p.reserve)})
    results = hand_made_results(full)
    write_results(full, results)
    loaded = load_result_files(p)
    assert {r.config.seed for r in loaded.results} == {1, 2, 3}
    assert len(loaded.results) == len(results) and not loaded.problems
