"""plan: exact sizes, unique and stable ids, dependencies, and ids that change only where the
result can change."""

from __future__ import annotations

from pathlib import Path

import pytest
from xstilts.operator.experiment.plan import Plan, plan
from xstilts.operator.experiment.spec import ExperimentSpec, load_spec_text, parse_document
from xstilts.trainer.config import Stage
from xstilts.trainer.rundir import RunDir

EXAMPLES = Path(__file__).parents[2] / "examples"


def load(name: str) -> ExperimentSpec:
    return load_spec_text((EXAMPLES / name).read_text(), name)


# Counted by hand: phase 2 = models × intermediate arms × seeds;
# phase 3 = models × (arms + baseline) × targets × seeds.
@pytest.mark.parametrize(("example", "intermediate", "target"), [
    # 9 tasks + all9 group + the two variant arms (mnli-mlm, mnli-translate-train), 9 XTREME targets,
    # 3 phase-2 learning rates: 108 + the 27 baseline runs; the 324 arm target runs of the selected
    # rates wait for the selection (972 held, 3 per run)
    ("phang2020.yaml", 1 * 12 * 3 * 3, 1 * 1 * 9 * 3),
    ("scaling.yaml", 4 * 4 * 3, 4 * 5 * 2 * 3),       # mnli, squad_v1, hellaswag, all9; 48 + 120
    ("demo.yaml", 3 * 2 * 3, 3 * 3 * 2 * 3),          # mnli, hellaswag at minSeeds 3; 18 + 54
])
def test_plan_sizes_are_exact(example: str, intermediate: int, target: int) -> None:
    p = plan(load(example))
    assert p.count(Stage.INTERMEDIATE) == intermediate
    assert p.count(Stage.TARGET) == target
    assert len(p.runs) == intermediate + target
    spec = load(example)
    # run_count is the most the grid can cost: the replication reserve up to maxSeeds included,
    # and one target run per arm of a searched phase-2 rate
    assert len(p.runs) + len(p.reserve) + len(p.held) // max(
        1, len(spec.hyperparameters.intermediate.learning_rates)) == spec.run_count
    assert len({r.run_id for r in p.runs}) == len(p.runs)


@pytest.mark.parametrize("example", ["phang2020.yaml", "scaling.yaml", "demo.yaml"])
def test_plan_is_a_dag_in_dependency_order(example: str) -> None:
    p = plan(load(example))
    seen: set[str] = set()
    for run in p.runs:
        assert all(parent in seen for parent in run.depends_on), run.labels
        seen.add(run.run_id)
        if run.config.stage is Stage.TARGET:
            baseline = run.labels.intermediate == "baseline"
            assert (run.config.init_from_run is None) == baseline
            assert run.depends_on == (() if baseline else (run.config.init_from_run,))
            if not baseline:
                parent = p.by_id[run.depends_on[0]]
                assert parent.config.stage is Stage.INTERMEDIATE
                assert (parent.labels.model, parent.labels.intermediate, parent.config.seed) == (
                    run.labels.model, run.labels.intermediate, run.config.seed)


def test_each_checkpoint_is_shared_by_every_target() -> None:
    p = plan(load("phang2020.yaml"))
    for run in p.runs:
        if run.config.stage is Stage.INTERMEDIATE:
            dependants = [d for d in p.held if run.run_id in d.depends_on]  # its phase-2 rate searched
            assert sorted(d.labels.target for d in dependants) == sorted(
                ["xnli", "pawsx", "udpos", "panx", "xquad", "mlqa", "tydiqa", "bucc2018", "tatoeba"])


def test_same_spec_planned_twice_gives_identical_ids() -> None:
    first = [r.run_id for r in plan(load("scaling.yaml")).runs]
    second = [r.run_id for r in plan(load("scaling.yaml")).runs]
    assert first == second


def test_ids_ignore_locations_resources_and_names() -> None:
    spec = load("scaling.yaml")
    ids = [r.run_id for r in plan(spec).runs]
    moved = spec.model_copy(update={"name": "elsewhere"})
    assert [r.run_id for r in plan(moved, storage_root="/mnt/other").runs] == ids


def _with(spec: ExperimentSpec, **hyperparameters: dict) -> ExperimentSpec:
    document = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key, value in hyperparameters.items():  # per-task entries merge into the spec's own
        document["hyperparameters"][key] = document["hyperparameters"].get(key, {}) | value
    return parse_document(document)


def test_changing_a_hyperparameter_changes_only_the_affected_ids() -> None:
    spec = load("phang2020.yaml")
    before = {(r.labels.intermediate, r.labels.target, r.config.seed): r.run_id for r in plan(spec).runs}
    after_spec = _with(spec, perTask={"pawsx": {"epochs": 3}})
    after = {(r.labels.intermediate, r.labels.target, r.config.seed): r.run_id for r in plan(after_spec).runs}
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {key for key in before if key[1] == "pawsx"}


def test_changing_an_intermediate_hyperparameter_propagates_to_its_dependants() -> None:
    spec = load("phang2020.yaml")

    def ids(p: Plan) -> dict[tuple[int, str, str | None, int], str]:  # by position: the learning rates repeat cells
        return {(i, r.labels.intermediate, r.labels.target, r.config.seed): r.run_id
                for i, r in enumerate((*p.runs, *p.held))}

    before = ids(plan(spec))
    after = ids(plan(_with(spec, perTask={"qqp": {"epochs": 1}})))
    changed = {key for key in before if before[key] != after[key]}
    # The qqp checkpoints (one per searched rate) change, so do the target runs that start from
    # them; nothing else.
    assert changed == {key for key in before if key[1] == "qqp"}
    assert len(changed) == 3 * 3 * (1 + 9)


def test_overrides_resolve_most_specific_last() -> None:
    p = plan(load("scaling.yaml"))
    lr = {(r.labels.model, r.config.stage.value, r.config.tasks[0]): r.config.hyperparameters.learning_rate
          for r in p.runs}
    assert lr[("large", "intermediate", "mnli")] == 1e-5        # spec stage default
    assert lr[("xxl", "intermediate", "mnli")] == 5e-6          # per model
    assert lr[("base", "target", "xnli")] == 2e-5               # per model beats stage
    squad = next(r for r in p.runs if r.config.tasks == ("squad_v1",))
    assert squad.config.hyperparameters.max_seq_length == 384   # the task's own length


def test_a_stages_per_model_settings_beat_the_models_and_stay_in_their_stage() -> None:
    spec = _with(load("scaling.yaml"), target={"perModel": {"xxl": {"learningRate": 3e-6, "epochs": 7}}},
                 perTask={"pawsx": {"epochs": 9}})
    hp = {(r.labels.model, r.config.stage.value, r.config.tasks[0]): r.config.hyperparameters for r in plan(spec).runs}
    assert (hp[("xxl", "target", "xnli")].learning_rate, hp[("xxl", "target", "xnli")].epochs) == (3e-6, 7)
    assert hp[("xxl", "target", "pawsx")].epochs == 9                        # per task beats it
    assert hp[("xxl", "intermediate", "mnli")].learning_rate == 5e-6         # perModel, as before
    assert hp[("xxl", "intermediate", "mnli")].epochs == 2
    assert (hp[("xl", "target", "xnli")].learning_rate, hp[("xl", "target", "xnli")].epochs) == (7e-6, 5)


def test_gpu_hours_are_estimated_and_totalled() -> None:
    p = plan(load("scaling.yaml"))
    assert all(r.gpu_hours is not None and r.gpu_hours > 0 for r in p.runs)
    assert p.gpu_hours == pytest.approx(sum(r.gpu_hours or 0 for r in p.runs))
    by_model = {r.labels.model: r.gpu_hours for r in p.runs
                if r.config.tasks == ("mnli",) and r.config.seed == 1}
    # Same tokens, so cost scales with parameters.
    assert by_model["xxl"] / by_model["base"] == pytest.approx(10_700_000_000 / 278_000_000, rel=1e-6)


def test_phase3_runs_carry_the_checkpoint_location_of_their_parent() -> None:
    p = plan(load("demo.yaml"), storage_root="/data/demo")
    run = next(r for r in p.runs if r.depends_on)
    assert run.config.init_model_dir == f"/data/demo/runs/{run.depends_on[0]}/model"
    assert RunDir.of(run.config).result == Path(f"/data/demo/runs/{run.run_id}/result.json")
