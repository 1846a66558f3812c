"""The paper's two variants as options of an intermediate arm (multiTaskGroups[*].mlm,
.translateTrain): the spec accepts and checks them, plan puts them into the arm's phase-2
runs (and nowhere else), RUN.json and the run identity carry them only where set, the arm's
runs are tagged with the variant in MLflow, and the report shows the arm as an arm of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.cluster.render import render_run
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import ExperimentSpec, SpecError, load_spec_text
from xstilts.trainer.config import RunConfig, Stage
from xstilts.trainer.tracking.buffer import VARIANT_TAG, RunIdentity
from xstilts.trainer.tracking.tracker import config_params

BASE = """
name: variants
models:
  - {name: base, pretrained: FacebookAI/xlm-roberta-base, resources: {gpus: 1}}
intermediateTasks: [mnli]
targets: [xnli]
data: {mnli: /data/mnli}
"""
ARMS = """
multiTaskGroups:
  - {name: mnli-mlm, tasks: [mnli], mlm: {ratio: 0.2, corpus: /data/wiki}}
  - {name: mnli-tt, tasks: [mnli], translateTrain: [de, fr]}
"""


def spec_of(text: str) -> ExperimentSpec:
    return load_spec_text(text, "variants.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as e:
        spec_of(text)
    return e.value.problems


def test_the_spec_reads_both_variants_as_arms_of_their_own() -> None:
    spec = spec_of(BASE + ARMS)
    assert spec.intermediates == ["mnli", "mnli-mlm", "mnli-tt"]
    mlm, tt = spec.multi_task_groups
    assert mlm.mlm is not None and mlm.mlm.ratio == 0.2 and mlm.variant == "mlm"
    assert tt.translate_train == ["de", "fr"] and tt.variant == "translate-train"
    both = spec_of(BASE + "multiTaskGroups:\n  - {name: b, tasks: [mnli], translateTrain: [de],"
                   " mlm: {ratio: 0.5, corpus: c.txt}}\n")
    assert both.multi_task_groups[0].variant == "mlm+translate-train"


@pytest.mark.parametrize(("arm", "field", "words"), [
    ("{name: m, tasks: [mnli], mlm: {ratio: 1.0, corpus: /c}}", "multiTaskGroups[0].mlm.ratio", "less than 1"),
    ("{name: m, tasks: [mnli], mlm: {ratio: 0, corpus: /c}}", "multiTaskGroups[0].mlm.ratio", "greater than 0"),
    ("{name: m, tasks: [mnli], mlm: {ratio: 0.2}}", "multiTaskGroups[0].mlm.corpus", "required"),
    ("{name: m, tasks: [mnli], mlm: {ratio: 0.2, corpus: /a/../b}}", "multiTaskGroups[0].mlm.corpus",
     "not a plain path"),
    ("{name: m, tasks: [mnli], mlm: {ratio: 0.2, corpus: /c, maskProbability: 0.3}}",
     "multiTaskGroups[0].mlm.maskProbability", "unknown field"),
    ("{name: t, tasks: [mnli], translateTrain: [en, de]}", "multiTaskGroups[0].translateTrain", "English is always"),
    ("{name: t, tasks: [mnli], translateTrain: [de, de]}", "multiTaskGroups[0].translateTrain", "duplicate"),
    ("{name: t, tasks: [mnli], translateTrain: [German]}", "multiTaskGroups[0].translateTrain[0]", "pattern"),
    ("{name: t, tasks: [mnli], translateTrain: []}", "multiTaskGroups[0].translateTrain", "at least 1"),
    ("{name: one, tasks: [mnli]}", "multiTaskGroups[0].tasks", "list it there"),
])
def test_a_bad_variant_is_refused_naming_the_field_and_the_fix(arm: str, field: str, words: str) -> None:
    lines = problems(BASE + f"multiTaskGroups:\n  - {arm}\n")
    assert any(line.startswith(f"{field}:") and words in line for line in lines), lines


def test_translate_train_without_the_tasks_data_entry_is_refused_by_validate(tmp_path: Path) -> None:
    text = BASE.replace("data: {mnli: /data/mnli}", "") + ARMS
    lines = problems(text)
    assert len(lines) == 1 and lines[0].startswith("data.mnli:") and "translateTrain" in lines[0], lines
    assert "<language>/train.jsonl" in lines[0]
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "data.mnli" in result.output and "Traceback" not in result.output


def test_two_arms_with_the_same_tasks_need_different_variants() -> None:
    same = BASE + ARMS + "  - {name: again, tasks: [mnli], translateTrain: [fr, de]}\n"
    assert any("same variants" in line for line in problems(same))
    spec_of(BASE + ARMS + "  - {name: other, tasks: [mnli], translateTrain: [de]}\n")  # another language set


def test_plan_puts_the_variant_into_the_arms_phase2_runs_only() -> None:
    spec = spec_of(BASE + ARMS)
    p = plan(spec)
    phase2 = {r.labels.intermediate: r.config for r in p.runs if r.config.stage is Stage.INTERMEDIATE}
    assert phase2["mnli"].mlm is None and phase2["mnli"].train_languages == ()
    assert phase2["mnli-mlm"].mlm is not None and phase2["mnli-mlm"].mlm.ratio == 0.2
    assert phase2["mnli-mlm"].mlm.corpus == "/data/wiki" and phase2["mnli-mlm"].train_languages == ()
    assert phase2["mnli-tt"].train_languages == ("de", "fr") and phase2["mnli-tt"].task_data == {"mnli": "/data/mnli"}
    # three distinct phase-2 runs of one task, each with its own targets
    assert len({c.run_id for c in phase2.values()}) == 3
    for arm, variant in (("mnli-mlm", "mlm"), ("mnli-tt", "translate-train")):
        targets = [r for r in p.runs if r.config.stage is Stage.TARGET and r.labels.intermediate == arm]
        assert len(targets) == 1 and targets[0].depends_on == (phase2[arm].run_id,)
        assert targets[0].labels.variant == variant and targets[0].config.mlm is None
    # MLM steps come on top of the task's epochs: more tokens and GPU-hours than the plain arm
    tokens = {r.labels.intermediate: r.train_tokens for r in p.runs if r.config.stage is Stage.INTERMEDIATE}
    assert tokens["mnli-mlm"] > tokens["mnli"] and tokens["mnli-tt"] == 3 * tokens["mnli"]


def test_adding_variant_arms_changes_no_other_run() -> None:
    before = {r.run_id: r.config.to_json() for r in plan(spec_of(BASE)).runs}
    after = {r.run_id: r.config.to_json() for r in plan(spec_of(BASE + ARMS)).runs}
    assert set(before) < set(after)
    assert all(after[i] == before[i] for i in before)  # byte for byte: RUN.json of the other runs
    assert all('"mlm"' not in j and "train_languages" not in j and '"variant"' not in j for j in before.values())


def test_run_json_and_identity_carry_the_variant_only_where_set() -> None:
    p = plan(spec_of(BASE + ARMS))
    by_arm = {r.labels.intermediate: r for r in p.runs if r.config.stage is Stage.INTERMEDIATE}
    mlm_doc = json.loads(by_arm["mnli-mlm"].config.to_json())
    assert mlm_doc["mlm"] == {"ratio": 0.2, "corpus": "/data/wiki", "mask_probability": 0.15}
    assert mlm_doc["labels"]["variant"] == "mlm" and "train_languages" not in mlm_doc
    assert RunConfig.model_validate(mlm_doc) == by_arm["mnli-mlm"].config  # RUN.json reads back
    tt = by_arm["mnli-tt"].config
    assert tt.identity()["train_languages"] == ["de", "fr"] and "mlm" not in tt.identity()
    assert "mlm" not in by_arm["mnli"].config.identity()
    # the ratio is part of what the run is
    other = spec_of(BASE + ARMS.replace("ratio: 0.2", "ratio: 0.3"))
    assert by_arm["mnli-mlm"].run_id not in {r.run_id for r in plan(other).runs}
    # rendered: the Job's RUN.json holds the variant
    spec = spec_of(BASE + ARMS)
    config_map = next(o for o in render_run(by_arm["mnli-mlm"], spec) if o["kind"] == "ConfigMap")
    assert '"mlm"' in next(iter(config_map["data"].values()))


def test_a_runconfig_refuses_variants_where_they_cannot_work() -> None:
    base = {"model": "m", "stage": "intermediate", "tasks": ["mnli"]}
    with pytest.raises(ValueError, match="need task_data"):
        RunConfig.model_validate({**base, "train_languages": ["de"]})
    with pytest.raises(ValueError, match="intermediate runs only"):
        RunConfig.model_validate({"model": "m", "stage": "target", "tasks": ["xnli"],
                                  "mlm": {"ratio": 0.2, "corpus": "c.txt"}})
    with pytest.raises(ValueError, match="other than 'en'"):
        RunConfig.model_validate({**base, "train_languages": ["en"], "task_data": {"mnli": "d"}})
    with pytest.raises(ValueError, match=r"'\.\.'"):
        RunConfig.model_validate({**base, "mlm": {"ratio": 0.2, "corpus": "a/../b"}})


def test_mlflow_params_and_tags_name_the_variant() -> None:
    p = plan(spec_of(BASE + ARMS))
    by_arm = {r.labels.intermediate: r.config for r in p.runs if r.config.stage is Stage.INTERMEDIATE}
    params = config_params(by_arm["mnli-mlm"])
    assert params["mlm.ratio"] == "0.2" and params["mlm.corpus"] == "/data/wiki"
    assert params["labels.variant"] == "mlm"
    assert config_params(by_arm["mnli-tt"])["train_languages"] == "de,fr"
    assert "mlm.ratio" not in config_params(by_arm["mnli"]) and "labels.variant" not in config_params(by_arm["mnli"])
    assert RunIdentity.of(by_arm["mnli-tt"]).tags[VARIANT_TAG] == "translate-train"
    assert VARIANT_TAG not in RunIdentity.of(by_arm["mnli"]).tags
    target = next(r.config for r in p.runs if r.config.stage is Stage.TARGET and r.labels.intermediate == "mnli-mlm")
    assert RunIdentity.of(target).tags[VARIANT_TAG] == "mlm"


def test_plan_cli_shows_the_variant_arms(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(BASE + ARMS, encoding="utf-8")
    result = CliRunner().invoke(app, ["plan", str(path), "--output", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    variants = {r["intermediate"]: r.get("variant") for r in doc["runs"]}
    assert variants == {"mnli": None, "mnli-mlm": "mlm", "mnli-tt": "translate-train", "baseline": None}


def test_the_report_shows_each_variant_arm_as_an_arm_of_its_own() -> None:
    from xstilts.operator.report.build import build_report, grid_of, to_markdown
    from xstilts.trainer.config import RunResult

    spec = spec_of(BASE + ARMS + "evalLanguages: {xnli: [en, de]}\n")
    gain = {"baseline": 0.0, "mnli": 0.04, "mnli-mlm": 0.02, "mnli-tt": 0.06}
    results = []
    for run in plan(spec).runs:
        target = run.labels.target is not None
        score = 0.6 + gain[run.labels.intermediate]
        results.append(RunResult(
            run_id=run.run_id, config=run.config, metrics={"dev.accuracy": score},
            languages={"en": {"accuracy": score + 0.1}, "de": {"accuracy": score}} if target else {},
            parameter_count=270_000_000, tokens_seen=1, train_steps=1, wall_seconds=1.0, tokens_per_second=1.0,
            finished_at="2025-01-01T00:00:00+00:00"))
    report = build_report(results, grid_of(spec))
    markdown = to_markdown(report)
    for arm in ("mnli-mlm", "mnli-tt"):
        assert arm in markdown
    # zero-shot (de) gains over the baseline, in points, per arm
    assert {arm: round(report.model_averages[("base", arm)].mean, 6) for arm in ("mnli", "mnli-mlm", "mnli-tt")} == {
        "mnli": 4.0, "mnli-mlm": 2.0, "mnli-tt": 6.0}
