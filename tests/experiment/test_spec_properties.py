"""Property-based: any document is either accepted or rejected with a SpecError (never another
exception), and the plan of any accepted spec is a DAG whose every dependency is planned."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import SpecError, parse_document
from xstilts.trainer.tasks import INTERMEDIATE_TASKS, TARGET_TASKS

names = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,12}[a-z0-9]", fullmatch=True), st.text(max_size=20))
task_names = st.one_of(st.sampled_from(INTERMEDIATE_TASKS + TARGET_TASKS), st.text(max_size=10))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=15))

resources = st.fixed_dictionaries({}, optional={
    "gpus": st.one_of(st.integers(-1, 17), scalars),
    "nodes": st.integers(0, 4),
    "zeroStage": st.one_of(st.sampled_from([0, 1, 2, 3, "auto", 4, "two"]), scalars),
    "offload": st.sampled_from(["none", "optimizer", "all", "gpu"]),
    "gpuMemoryGb": st.one_of(st.floats(0.5, 200), scalars),
})
models = st.fixed_dictionaries(
    {"name": names, "pretrained": st.one_of(st.sampled_from(["FacebookAI/xlm-roberta-base",
                                                             "facebook/xlm-roberta-xxl", "/models/x"]),
                                            st.text(max_size=30))},
    optional={"parameters": st.one_of(st.integers(-1, 2 * 10**10), scalars), "resources": resources},
)
hyper = st.fixed_dictionaries({}, optional={
    "learningRate": st.one_of(st.floats(-1, 2), scalars),
    "batchSize": st.one_of(st.integers(-2, 100), scalars),
    "epochs": st.one_of(st.floats(0, 10), scalars),
    "maxSeqLength": st.integers(0, 10000),
})
stage_hyper = st.one_of(hyper, st.fixed_dictionaries({"perModel": st.dictionaries(names, hyper, max_size=2)}))
specs = st.fixed_dictionaries(
    {"name": names, "models": st.lists(models, max_size=3), "targets": st.lists(task_names, max_size=3)},
    optional={
        "intermediateTasks": st.lists(task_names, max_size=4),
        "multiTaskGroups": st.lists(st.fixed_dictionaries({"name": names, "tasks": st.lists(task_names, max_size=4)}),
                                    max_size=2),
        "seeds": st.lists(st.one_of(st.integers(-2, 5), scalars), max_size=4),
        "hyperparameters": st.fixed_dictionaries({}, optional={
            "intermediate": hyper, "target": stage_hyper,
            "perTask": st.dictionaries(task_names, hyper, max_size=2),
            "perModel": st.dictionaries(names, hyper, max_size=2)}),
        "cluster": st.fixed_dictionaries({}, optional={
            "namespace": names, "maxParallel": st.one_of(st.integers(-1, 20), scalars),
            "storage": st.fixed_dictionaries({}, optional={"mountPath": st.text(max_size=20),
                                                           "pvc": names})}),
        "unknownField": scalars,
    },
)


def _check(document: Any) -> None:
    try:
        spec = parse_document(document)
    except SpecError as e:
        assert e.problems and all(isinstance(p, str) and ": " in p for p in e.problems)
        return
    p = plan(spec)
    ids = [r.run_id for r in p.runs]
    assert len(ids) == len(set(ids)) == spec.run_count
    seen: set[str] = set()
    for run in p.runs:
        assert set(run.depends_on) <= seen
        seen.add(run.run_id)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs)
def test_any_spec_is_accepted_or_rejected_cleanly(document: dict) -> None:
    _check(document)


@settings(max_examples=200, deadline=None)
@given(st.one_of(scalars, st.lists(scalars), st.dictionaries(st.text(max_size=8), scalars)))
def test_any_yaml_value_is_rejected_cleanly(document: object) -> None:
    _check(document)


valid_specs = st.fixed_dictionaries({
    "name": st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True),
    "models": st.lists(st.fixed_dictionaries({
        "name": st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
        "pretrained": st.sampled_from(["FacebookAI/xlm-roberta-base", "FacebookAI/xlm-roberta-large",
                                       "facebook/xlm-roberta-xl"]),
        "resources": st.fixed_dictionaries({"gpus": st.integers(0, 8)}),
    }), min_size=1, max_size=3, unique_by=(lambda m: m["name"], lambda m: m["pretrained"])),
    "intermediateTasks": st.lists(st.sampled_from(INTERMEDIATE_TASKS), unique=True, max_size=4),
    "targets": st.lists(st.sampled_from(TARGET_TASKS), unique=True, min_size=1),
    "seeds": st.lists(st.integers(0, 100), unique=True, min_size=1, max_size=3),
}).map(lambda d: {**d, "data": {"ccg": "corpora/ccg"}} if "ccg" in d["intermediateTasks"] else d)
# (ccg is the one local-only task: valid only with its data entry, and data only for a task in the grid)


@settings(max_examples=150, deadline=None)
@given(valid_specs)
def test_plan_of_an_accepted_spec_is_a_complete_dag(document: dict) -> None:
    spec = parse_document(document)  # these are valid by construction
    p = plan(spec)
    assert len(p.runs) == spec.run_count
    for run in p.runs:
        for parent in run.depends_on:
            assert parent in p.by_id
