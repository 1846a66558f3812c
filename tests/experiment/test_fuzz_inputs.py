"""Bad input, fuzzed (hypothesis): specs, `kind: Experiment` objects as `kubectl apply` sends
them, and RunConfigs as `python -m xstilts.trainer RUN.json` reads them.

Each document starts from a valid one and is damaged: a field replaced by a hostile string
(shell syntax, `$(VAR)`, quotes, line breaks, NUL, unicode, path traversal, 10 kB), by a value
of the wrong type, deleted, renamed, or joined by an unknown field. Whatever comes in:

- it is rejected with a SpecError / ValidationError whose every line names a field path, and
  the CLI exits 2 (the trainer: ExitCode.INVALID) with no traceback; or
- it is accepted, and then plan and render work, every path a run writes (run directory,
  checkpoint, result, the phase-2 checkpoint it reads) stays under the experiment's storage
  root, the Job's command holds only fixed words and numbers (no shell, no args, no user
  string), no env value can expand a variable, every name, label and selector is one the API
  server accepts, and every pod is restricted.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from cluster.test_least_privilege import run_pod_violations
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from pydantic import ValidationError
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.cluster.render import (
    RENDEZVOUS_PORT,
    RUN_CONFIG_PATH,
    OwnerRef,
    pod_storage_root,
    render_experiment,
    result_file,
)
from xstilts.operator.experiment.plan import default_storage_root, plan
from xstilts.operator.experiment.spec import MAX_RUNS, ExperimentSpec, SpecError, parse_document
from xstilts.trainer.config import ExitCode, RunConfig
from xstilts.trainer.rundir import RunDir

# --- what a hostile user sends ----------------------------------------------------------------

SHELL = ["a;rm -rf /", "$(id)", "`id`", "${HOME}", "$(HF_TOKEN)", "$$(x)", "a|sh", "a&&b", "'quoted'",
         '"double"', "-rf", "--help", "a b", "*", "?"]
CONTROL = ["line\nbreak", "cr\rreturn", "nul\0byte", "tab\tx", "esc\x1b[31m", "del\x7f"]
UNICODE = ["Ünïcødé", "名前", "\u202egnp.exe", "zero\u200bwidth", "🚀", "ﬁ", "Ⅻ", "İ"]
TRAVERSAL = ["..", "../x", "a/../../b", "/data/../etc", "/", "//etc", "/etc", "/proc/self", "/tmp", "/dev/shm",
             "~", "~/x", "~root/.ssh", "%2e%2e/x", "..%2f..%2fetc", "%2E%2E", "./.", "\\..\\..\\windows",
             "file:///etc/passwd", "s3://bucket/../other", "s3://bucket/%2e%2e/x", "C:\\x"]
HOSTILE = [*SHELL, *CONTROL, *UNICODE, *TRAVERSAL, "", " ", "x" * 10_000, "a" * 64, "A-Upper", "-lead", "trail-"]

hostile = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=30),
    st.builds(lambda a, b, c: a + b + c, st.sampled_from(["", "ok-", "/data/", "org/"]), st.sampled_from(HOSTILE),
              st.sampled_from(["", "-x", "/y"])),
)
wrong_type = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2), hostile,
)

# --- valid starting points ---------------------------------------------------------------------

SPEC: dict[str, Any] = {
    "name": "fuzz",
    "models": [{"name": "base", "pretrained": "FacebookAI/xlm-roberta-base", "displayName": "XLM-R base",
                "parameters": 278000000,
                "resources": {"gpus": 1, "zeroStage": "auto", "offload": "none", "cpu": "8", "memory": "64Gi"}}],
    "intermediateTasks": ["mnli"],
    "multiTaskGroups": [{"name": "nli-qa", "tasks": ["mnli", "squad_v1"], "samplingTemperature": 2.0}],
    "targets": ["xnli"],
    "seeds": [1],
    "hyperparameters": {"intermediate": {"learningRate": 1e-5}, "perModel": {"base": {"epochs": 2}},
                        "perTask": {"xnli": {"batchSize": 16}}},
    "evalLanguages": {"xnli": ["en", "de"]},
    "data": {"mnli": "/datasets/mnli"},
    "cluster": {"namespace": "research", "image": "ghcr.io/xstilts/trainer:0.1.0", "queue": "gpu",
                "nodeSelector": {"nvidia.com/gpu.product": "H100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "storage": {"pvc": "xstilts-runs", "mountPath": "/data"},
                "secrets": {"hfToken": "hf-token", "mlflow": "mlflow-credentials", "s3": "s3-credentials"}},
    "mlflow": {"trackingUri": "http://mlflow:5000", "experimentName": "fuzz"},
    "planning": {"maxRuns": 100},
}
# As the controller receives it from the API server: with the metadata the server adds.
EXPERIMENT: dict[str, Any] = {
    "apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment",
    "metadata": {"name": "fuzz", "namespace": "research", "labels": {"team": "nlp"},
                 "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                 "uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "generation": 3, "resourceVersion": "12345",
                 "creationTimestamp": "2026-01-01T00:00:00Z",
                 "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1"}]},
    "spec": SPEC,
    "status": {"phase": "Running"},
}
STARTS = {"spec": SPEC, "Experiment": EXPERIMENT}

Path_ = tuple[str | int, ...]


def nodes(doc: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Every field and list item of a document, by path."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*path, key)
            yield from nodes(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield (*path, i)
            yield from nodes(value, (*path, i))


def string_fields(doc: Any) -> list[Path_]:
    return [p for p in nodes(doc) if isinstance(get(doc, p), str)]


def map_keys(doc: Any) -> list[Path_]:
    """Fields whose name is the user's (perModel.<model>, data.<task>, nodeSelector.<key> ...)."""
    free = {"perModel", "perTask", "evalLanguages", "data", "nodeSelector", "labels"}
    return [p for p in nodes(doc) if isinstance(p[-1], str) and len(p) > 1 and p[-2] in free]


def get(doc: Any, path: Path_) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def replace(doc: Any, path: Path_, value: Any) -> None:
    get(doc, path[:-1])[path[-1]] = value


def delete(doc: Any, path: Path_) -> None:
    parent = get(doc, path[:-1])
    del parent[path[-1]]


def rename(doc: Any, path: Path_, new: str) -> None:
    parent = get(doc, path[:-1])
    parent[new] = parent.pop(path[-1])


def dotted(path: Path_) -> str:
    return ".".join(str(p) for p in path)


@st.composite
def damaged_documents(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(STARTS[draw(st.sampled_from(sorted(STARTS)))])
    for _ in range(draw(st.integers(1, 3))):
        candidates = list(nodes(doc))
        if not candidates:
            break
        mutate(draw, doc, draw(st.sampled_from(candidates)))
    return doc


def mutate(draw: st.DrawFn, doc: Any, path: Path_) -> bool:
    """Change `doc` at `path` in one drawn way; False when the way drawn does not apply there
    (a rename or an added field under a list)."""
    how = draw(st.sampled_from(["hostile", "wrong type", "delete", "rename", "unknown field"]))
    if how == "hostile":
        replace(doc, path, draw(hostile))
    elif how == "wrong type":
        replace(doc, path, draw(wrong_type))
    elif how == "delete":
        delete(doc, path)
    elif how == "rename" and isinstance(get(doc, path[:-1]), dict):
        rename(doc, path, draw(hostile))
    elif isinstance(get(doc, path[:-1]), dict):
        get(doc, path[:-1])[draw(hostile)] = draw(wrong_type)
    else:
        return False
    return True


# --- the properties ----------------------------------------------------------------------------

# A problem line: `field.path[0].x['odd key']: message`, or `<document>` / `<spec>` for the
# whole thing.
_KEY = r"(\.?[A-Za-z_][\w-]*|\[[0-9]+\]|\[(?P<q>['\"]).*?((?P=q)|…)\])"  # a long key is cut short: '...…'
PROBLEM = re.compile(rf"^(<document>|<spec>|apiVersion/kind|{_KEY}+): \S")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_rejection(error: SpecError) -> None:
    assert error.problems, error
    for line in error.problems:
        assert PROBLEM.match(line), f"problem without a field path: {line!r}"
        assert "\n" not in line and "\0" not in line, f"problem spans lines: {line!r}"
        assert len(line) < 2000, f"problem line of {len(line)} characters"


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        return False
    return len(name) <= 63 and bool(LABEL_NAME.fullmatch(name))


def valid_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(LABEL_VALUE.fullmatch(value))


def expands_a_variable(value: str) -> bool:
    """Whether the kubelet would expand `$(NAME)` somewhere in an env value or command word
    (`$$` is an escaped `$`)."""
    i = 0
    while i < len(value):
        if value.startswith("$$", i):
            i += 2
        elif value.startswith("$(", i):
            return True
        else:
            i += 1
    return False


def within(path: str, root: str) -> bool:
    """`path` is `root` or below it, with no '..' and no other scheme."""
    scheme, _, rest = path.rpartition("://")
    root_scheme, _, root_rest = root.rpartition("://")
    if scheme != root_scheme or ".." in PurePosixPath(rest).parts:
        return False
    root_path, child = PurePosixPath(root_rest), PurePosixPath(rest)
    return child == root_path or root_path in child.parents


def command_is_fixed(command: list[str], job: str) -> bool:
    """The exec array holds only fixed words, numbers and the Job's own (validated) name."""
    fixed = {"python", "-m", "xstilts.trainer", RUN_CONFIG_PATH, "xstilts.trainer.launch", "--standalone",
             "--max_restarts=0",
             "--node_rank=$(JOB_COMPLETION_INDEX)", f"--master_port={RENDEZVOUS_PORT}", f"--master_addr={job}-0.{job}"}
    numbered = re.compile(r"--(nproc_per_node|nnodes|shutdown_timeout)=[0-9]+")
    return all(isinstance(w, str) and (w in fixed or numbered.fullmatch(w)) for w in command)


def check_accepted(spec: ExperimentSpec) -> None:
    p = plan(spec)
    assert 0 < len(p.runs) == spec.run_count <= spec.planning.max_runs
    local_root = default_storage_root(spec)
    for run in p.runs:
        c = run.config
        for written in (c.run_dir, f"{c.run_dir}/{RunDir.MODEL}", f"{c.run_dir}/{RunDir.RESULT}",
                        c.init_model_dir or c.run_dir):
            assert within(written, local_root), f"{written} is outside {local_root}"
    owner = OwnerRef(api_version="xstilts.dev/v1alpha1", kind="Experiment", name=spec.name, uid="u-1",
                     namespace="research")
    pod_root = pod_storage_root(spec)
    assert within(pod_root, spec.cluster.storage.mount_path)
    objects = render_experiment(p, spec, owner)
    for obj in objects:
        meta = obj["metadata"]
        assert DNS_LABEL.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert DNS_LABEL.fullmatch(meta["namespace"]), meta["namespace"]
        for key, value in meta["labels"].items():
            assert valid_label_key(key) and valid_label_value(value), (key, value)
        if obj["kind"] == "ConfigMap":
            config = RunConfig.model_validate_json(obj["data"]["run.json"])
            for written in (config.run_dir, f"{config.run_dir}/{RunDir.MODEL}", f"{config.run_dir}/{RunDir.RESULT}",
                            config.init_model_dir or config.run_dir, result_file(spec, config.run_id)):
                assert within(written, pod_root), f"{written} is outside {pod_root}"
        if obj["kind"] != "Job":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert run_pod_violations(pod, meta["name"]) == []
        (container,) = pod["containers"]
        assert "args" not in container
        assert command_is_fixed(container["command"], meta["name"]), container["command"]
        for env in container["env"]:
            assert ENV_NAME.fullmatch(env["name"])
            assert "value" not in env or not expands_a_variable(env["value"]), env
        for source in container.get("envFrom", []):
            assert DNS_SUBDOMAIN.fullmatch(source["secretRef"]["name"])
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        assert len(set(mounts)) == len(mounts), f"a volume mounted twice at one path: {mounts}"
        for key, value in (pod.get("nodeSelector") or {}).items():
            assert valid_label_key(key) and valid_label_value(value), (key, value)
        for toleration in pod.get("tolerations") or []:
            assert toleration.get("key") is None or valid_label_key(toleration["key"]), toleration
            if toleration.get("operator") == "Exists":
                assert not toleration.get("value"), toleration
            else:
                assert toleration.get("key") and valid_label_value(toleration.get("value", "")), toleration
            if "tolerationSeconds" in toleration:
                assert toleration.get("effect") == "NoExecute", toleration


def _count(outcome: str) -> None:
    """The accepted/rejected split, shown by `pytest --hypothesis-show-statistics`."""
    if currently_in_test_context():
        event(outcome)


def check_document(document: Any) -> ExperimentSpec | None:
    """The fuzz oracle: a clear rejection, or an accepted spec whose plan and objects are safe."""
    try:
        spec = parse_document(document)
    except SpecError as e:
        _count("rejected")
        check_rejection(e)
        return None
    _count("accepted")
    check_accepted(spec)
    return spec


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_starting_points_are_valid() -> None:
    for name, doc in STARTS.items():
        assert check_document(copy.deepcopy(doc)) is not None, name


@FUZZ
@given(damaged_documents())
def test_any_damaged_spec_or_experiment_is_a_clear_error_or_a_safe_plan(document: Any) -> None:
    check_document(document)


@pytest.mark.parametrize("path", string_fields(EXPERIMENT) + map_keys(EXPERIMENT), ids=dotted)
@settings(max_examples=40, deadline=None)
@given(value=hostile)
def test_hostile_strings_in_every_string_field_and_map_key(path: Path_, value: str) -> None:
    doc = copy.deepcopy(EXPERIMENT)
    if path in map_keys(EXPERIMENT):
        rename(doc, path, value)
    else:
        replace(doc, path, value)
    check_document(doc)


@pytest.mark.parametrize("path", list(nodes(SPEC)), ids=dotted)
@settings(max_examples=25, deadline=None)
@given(value=wrong_type)
def test_wrong_types_anywhere(path: Path_, value: Any) -> None:
    doc = copy.deepcopy(SPEC)
    replace(doc, path, value)
    check_document(doc)


REQUIRED = [("name",), ("models",), ("targets",), ("models", 0, "name"), ("models", 0, "pretrained"),
            ("multiTaskGroups", 0, "name"), ("multiTaskGroups", 0, "tasks")]


@pytest.mark.parametrize("path", REQUIRED, ids=dotted)
def test_a_missing_required_field_is_named(path: Path_) -> None:
    doc = copy.deepcopy(EXPERIMENT)
    delete(doc, ("spec", *path))
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    check_rejection(e.value)
    assert f"spec.{dotted(path).replace('.0.', '[0].')}: Field required" in e.value.problems


def test_an_experiment_without_its_spec_or_kind_is_named() -> None:
    for missing, field in (("spec", "spec: Field required"), ("kind", "apiVersion/kind: expected")):
        doc = copy.deepcopy(EXPERIMENT)
        del doc[missing]
        with pytest.raises(SpecError) as e:
            parse_document(doc)
        assert any(line.startswith(field) for line in e.value.problems), e.value.problems


# --- paths -------------------------------------------------------------------------------------

PATH_FIELDS = {
    "mountPath": ("cluster", "storage", "mountPath"),
    "data": ("data", "mnli"),
    "pretrained": ("models", 0, "pretrained"),
}


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("value", TRAVERSAL)
def test_path_traversal_is_rejected_or_stays_inside_the_storage_root(field: str, value: str) -> None:
    doc = copy.deepcopy(SPEC)
    replace(doc, PATH_FIELDS[field], value)
    spec = check_document(doc)
    if spec is None:
        return
    assert ".." not in PurePosixPath(value).parts
    if field == "mountPath":
        assert value.startswith("/") and PurePosixPath(value).parts[1:2] not in (("etc",), ("proc",), ("dev",),
                                                                                 ("tmp",), ())


@pytest.mark.parametrize("value", [*TRAVERSAL, "", "s3://bucket", "s3://bucket/a/b", "gs://b/x"])
def test_any_object_store_uri_is_refused_naming_the_field_and_the_fix(value: str) -> None:
    doc = copy.deepcopy(SPEC)
    replace(doc, ("cluster", "storage", "uri"), value)
    with pytest.raises(SpecError) as refused:
        parse_document(doc)
    check_rejection(refused.value)
    (problem,) = refused.value.problems
    assert problem.startswith("cluster.storage.uri: object storage is not supported yet")
    assert "cluster.storage.pvc" in problem and "ReadWriteMany" in problem


# --- grid size ---------------------------------------------------------------------------------


def grid(models: int, intermediates: int, groups: int, targets: int, seeds: int, max_runs: int) -> dict[str, Any]:
    from xstilts.trainer.tasks import INTERMEDIATE_TASKS, TARGET_TASKS

    doc: dict[str, Any] = {
        "name": "grid",
        "models": [{"name": f"m{i}", "pretrained": f"org/m{i}", "resources": {"gpus": 0}} for i in range(models)],
        "intermediateTasks": list(INTERMEDIATE_TASKS[:intermediates]),
        "multiTaskGroups": [{"name": f"g{i}", "tasks": ["mnli", INTERMEDIATE_TASKS[1 + i]]} for i in range(groups)],
        "targets": list(TARGET_TASKS[:targets]),
        "seeds": list(range(seeds)),
        "planning": {"maxRuns": max_runs},
    }
    if "ccg" in [*doc["intermediateTasks"], *(t for g in doc["multiTaskGroups"] for t in g["tasks"])]:
        doc["data"] = {"ccg": "corpora/ccg"}  # the one local-only task, which reads only its data entry
    return doc


@settings(max_examples=150, deadline=None)
@given(models=st.integers(1, 4), intermediates=st.integers(0, 9), groups=st.integers(0, 3), targets=st.integers(1, 2),
       seeds=st.integers(1, 30), max_runs=st.integers(1, 1500))
def test_a_grid_over_planning_max_runs_is_rejected_with_its_count(models: int, intermediates: int, groups: int,
                                                                  targets: int, seeds: int, max_runs: int) -> None:
    arms = intermediates + groups
    runs = models * seeds * (arms + (arms + 1) * targets)  # phase 2, then phase 3 with the baseline
    doc = grid(models, intermediates, groups, targets, seeds, max_runs)
    if runs <= max_runs:
        assert len(plan(parse_document(doc)).runs) == runs
        return
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    (line,) = e.value.problems
    assert line.startswith("planning.maxRuns: ")
    assert f"the grid has {runs} runs, more than planning.maxRuns ({max_runs})" in line


@pytest.mark.parametrize(("what", "doc"), [
    ("a million seeds", grid(1, 1, 0, 1, 1_000_000, 2000)),
    ("ten thousand models", grid(10_000, 1, 0, 1, 1, 2000)),
    ("a million seeds over the largest limit", grid(1, 9, 3, 2, 1_000_000, MAX_RUNS)),
])
def test_a_huge_grid_is_rejected_fast_with_its_count(what: str, doc: dict[str, Any]) -> None:
    started = time.monotonic()
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    assert time.monotonic() - started < 10, f"{what}: validation took {time.monotonic() - started:.1f} s"
    # Over the cap of its list (seeds, models) or over planning.maxRuns: either way with the count.
    assert any(line.startswith(("planning.maxRuns: the grid has", "seeds: List should have at most",
                                "models: List should have at most")) for line in e.value.problems), e.value.problems


def test_a_huge_string_gives_a_short_error() -> None:
    doc = copy.deepcopy(SPEC)
    doc["name"] = "n" * 1_000_000
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    check_rejection(e.value)


# --- the CLI: exit 2, every problem listed, no traceback --------------------------------------

runner = CliRunner()


def cli(args: list[str]) -> tuple[int, str, BaseException | None]:
    result = runner.invoke(app, args)
    return result.exit_code, result.output, result.exception


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=damaged_documents())
def test_cli_validate_and_plan_reject_bad_documents_with_exit_2(tmp_path: Path, document: Any) -> None:
    try:
        parse_document(document)
        return  # accepted: covered by the oracle above
    except SpecError:
        pass
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    for command in (["validate", str(path)], ["plan", str(path), "--output", "json"]):
        code, output, exception = cli(command)
        assert code == 2 and isinstance(exception, SystemExit), (command, output, exception)
        assert "Traceback" not in output
        assert any(line.startswith("  - ") for line in output.splitlines()), output


def test_cli_refuses_object_storage_with_exit_2_naming_the_field_and_the_fix(tmp_path: Path) -> None:
    """Runs would write an s3:// storage root to a relative local path and lose it: refused, in
    every command that reads a spec, before anything is planned or sent."""
    doc = copy.deepcopy(SPEC)
    doc["cluster"]["storage"] = {"uri": "s3://bucket/prefix"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    for command in (["validate", str(path)], ["plan", str(path)], ["submit", "--dry-run", str(path)]):
        code, output, exception = cli(command)
        assert code == 2 and isinstance(exception, SystemExit), (command, output, exception)
        assert "Traceback" not in output
        (problem,) = [line for line in output.splitlines() if line.startswith("  - ")]
        assert problem.startswith("  - cluster.storage.uri: object storage is not supported yet"), output
        assert "use cluster.storage.pvc with a ReadWriteMany PersistentVolumeClaim" in problem


# Documents that break the YAML reader itself rather than the spec.
UNREADABLE = {
    "not UTF-8": b"name: \xff\xfe\n",
    "NUL byte": b"name: a\x00b\n",
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "an integer of 5000 digits": b"name: x\nseeds: [" + b"9" * 5000 + b"]\n",
    "alias bomb": b"a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                  b"c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
                  b"e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
                  b"name: x\nmodels: *f\ntargets: *f\nseeds: *f\n",
    "a directory": None,
    "tabs": b"\t\t",
    "two documents": b"name: a\n---\nname: b\n",
    "a list as a key": b"? [a]\n: 1\n",
    "a mapping as a key": b"? name: x\n",
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_unreadable_documents_exit_2_without_a_traceback(tmp_path: Path, case: str) -> None:
    content = UNREADABLE[case]
    path = tmp_path / "spec.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    started = time.monotonic()
    code, output, exception = cli(["validate", str(path)])
    assert code == 2 and isinstance(exception, SystemExit), (output, exception)
    assert time.monotonic() - started < 10


def test_the_installed_cli_prints_no_traceback(tmp_path: Path) -> None:
    """The real entry point, in its own process, on the worst of the above."""
    for name in ("not UTF-8", "nested 100000 deep", "an integer of 5000 digits"):
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(UNREADABLE[name] or b"")
    out = subprocess.run([sys.executable, "-m", "xstilts.operator.cli", "validate", *map(str, tmp_path.iterdir())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout, out.stderr
    assert out.stderr.count("problem(s)") + out.stderr.count("error:") == 3, out.stderr


# --- RunConfig ----------------------------------------------------------------------------------

RUN_CONFIG: dict[str, Any] = {
    "model": "FacebookAI/xlm-roberta-base",
    "stage": "target",
    "tasks": ["xnli"],
    "seed": 1,
    "hyperparameters": {"learning_rate": 2e-5, "batch_size": 32, "max_steps": 10},
    "init_from_run": "0123456789ab",
    "eval_languages": ["en", "de"],
    "deepspeed": {"zero_stage": 2, "offload": "optimizer"},
    "resources": {"gpus_per_node": 2, "nodes": 1},
    "storage_root": "/data/exp",
    "task_data": {"xnli": "/datasets/xnli"},
    "tracking": {"tracking_uri": "http://mlflow:5000", "experiment_name": "exp"},
    "labels": {"experiment": "exp", "model": "base", "intermediate": "mnli", "target": "xnli"},
}


@st.composite
def damaged_run_configs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(RUN_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(nodes(doc))))
        how = draw(st.sampled_from(["hostile", "wrong type", "delete", "unknown field"]))
        if how == "hostile":
            replace(doc, path, draw(hostile))
        elif how == "wrong type":
            replace(doc, path, draw(wrong_type))
        elif how == "delete":
            delete(doc, path)
        elif isinstance(get(doc, path[:-1]), dict):
            get(doc, path[:-1])[draw(hostile)] = draw(wrong_type)
    return doc


def check_run_config(config: RunConfig) -> None:
    for written in (config.run_dir, f"{config.run_dir}/{RunDir.MODEL}", f"{config.run_dir}/{RunDir.RESULT}",
                    config.init_model_dir or config.run_dir):
        assert within(written, config.storage_root), f"{written} is outside {config.storage_root}"
    for path in (config.model, config.storage_root, *config.task_data.values()):
        assert not any(ord(ch) < 32 for ch in path) and ".." not in PurePosixPath(path).parts, path


@settings(max_examples=400, deadline=None)
@given(damaged_run_configs())
def test_any_damaged_run_config_is_a_validation_error_or_stays_in_its_storage_root(document: Any) -> None:
    try:
        text = json.dumps(document)
    except ValueError:
        text = None
    for parse in (lambda: RunConfig.model_validate(document),
                  lambda: RunConfig.model_validate_json(text) if text is not None else RunConfig.model_validate({})):
        try:
            config = parse()
        except ValidationError as e:
            assert all(isinstance(err["loc"], tuple) for err in e.errors())
            continue
        check_run_config(config)


# --- the trainer entry point ---------------------------------------------------------------------
# Slow (a process each), so a handful: one per kind of damage the fuzz covers.

BAD_RUN_CONFIGS: dict[str, tuple[bytes | None, str]] = {
    "not JSON": (b"{not json", "Invalid JSON"),
    "a list": (b"[1, 2]", "should be an object"),
    "wrong type": (json.dumps({**RUN_CONFIG, "seed": "one"}).encode(), "seed"),
    "unknown task": (json.dumps({**RUN_CONFIG, "tasks": ["xnlii"]}).encode(), "tasks"),
    "unknown field": (json.dumps({**RUN_CONFIG, "shell": "$(id)"}).encode(), "shell"),
    "storage root traversal": (json.dumps({**RUN_CONFIG, "storage_root": "/data/../../etc"}).encode(), "storage_root"),
    "NUL in the storage root": (json.dumps({**RUN_CONFIG, "storage_root": "/data/a\0b"}).encode(), "storage_root"),
    "init_from_run traversal": (json.dumps({**RUN_CONFIG, "init_from_run": "../../../etc"}).encode(), "init_from_run"),
    "nested 100000 deep": (b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "recursion"),
    "a directory": (None, "cannot read run config"),
}


def run_trainer(config_path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XSTILTS_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "xstilts.trainer", str(config_path)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=env)


def assert_invalid_in_one_line(out: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert out.returncode == ExitCode.INVALID, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{out.stderr}"
    assert lines[0].startswith("xstilts.trainer: invalid run: "), lines[0]
    for word in expected:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", BAD_RUN_CONFIGS)
def test_trainer_exits_invalid_with_a_one_line_reason(tmp_path: Path, case: str) -> None:
    content, expected = BAD_RUN_CONFIGS[case]
    path = tmp_path / "run.json"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert_invalid_in_one_line(run_trainer(path, tmp_path), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"], "the trainer wrote something"


def test_trainer_on_a_run_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(b'{"model": "\xff"}')
    assert_invalid_in_one_line(run_trainer(path, tmp_path), "run.json")


def test_missing_data_directory_names_the_task_and_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "datasets" / "xnli-not-there"
    config = RunConfig.model_validate({**RUN_CONFIG, "init_from_run": None, "stage": "target",
                                       "resources": {"gpus_per_node": 0}, "deepspeed": {},
                                       "storage_root": str(tmp_path / "out"), "task_data": {"xnli": str(missing)}})
    path = tmp_path / "run.json"
    path.write_text(config.to_json())
    line = assert_invalid_in_one_line(run_trainer(path, tmp_path), "xnli", str(missing))
    assert "missing data file" in line
    assert not (tmp_path / "out").exists(), "an invalid run must leave nothing that looks like a run"
