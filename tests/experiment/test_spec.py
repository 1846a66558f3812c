"""Spec validation through the CLI: every example is accepted; every broken spec exits 2 and
names the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.experiment.spec import SpecError, load_spec_text, parse_document

EXAMPLES = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
runner = CliRunner()

BASE: dict = {
    "name": "mini",
    "models": [{"name": "base", "pretrained": "FacebookAI/xlm-roberta-base", "resources": {"gpus": 1}}],
    "intermediateTasks": ["mnli"],
    "targets": ["xnli"],
    "seeds": [1],
}


def with_changes(**changes: object) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return spec


DELETE = object()


def validate(tmp_path: Path, document: object) -> tuple[int, str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(document) if not isinstance(document, str) else document)
    result = runner.invoke(app, ["validate", str(path)])
    return result.exit_code, result.output


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(example: Path) -> None:
    result = runner.invoke(app, ["validate", str(example)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output


def test_bare_spec_and_object_form_are_the_same_spec() -> None:
    obj = {"apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "mini"}, "spec": BASE}
    assert parse_document(obj) == parse_document(BASE)


INVALID: list[tuple[str, object, str]] = [
    ("unknown intermediate task", with_changes(intermediateTasks=["mnlii"]), "intermediateTasks[0]"),
    ("target used as intermediate", with_changes(intermediateTasks=["xnli"]), "intermediateTasks[0]"),
    ("unknown target", with_changes(targets=["xcopa"]), "targets[0]"),
    ("empty targets", with_changes(targets=[]), "targets"),
    ("no models", with_changes(models=[]), "models"),
    ("no seeds", with_changes(seeds=[]), "seeds"),
    ("duplicate seed", with_changes(seeds=[1, 1]), "seeds"),
    ("duplicate target", with_changes(targets=["xnli", "xnli"]), "targets"),
    ("duplicate intermediate", with_changes(intermediateTasks=["mnli", "mnli"]), "intermediateTasks"),
    ("unknown top-level field", with_changes(modles=[]), "modles"),
    ("unknown nested field", with_changes(models__0__gpu=2), "models[0].gpu"),
    ("name not DNS-1123", with_changes(name="My_Experiment"), "name"),
    ("name too long", with_changes(name="x" * 41), "name"),
    ("model name with a dot", with_changes(models__0__name="xlmr.base"), "models[0].name"),
    ("duplicate model names", with_changes(models=[BASE["models"][0], BASE["models"][0]]), "models"),
    ("negative GPUs", with_changes(models__0__resources={"gpus": -1}), "models[0].resources.gpus"),
    ("multi-node CPU", with_changes(models__0__resources={"gpus": 0, "nodes": 2}), "models[0].resources.nodes"),
    ("XXL on one small GPU", with_changes(models__0__pretrained="facebook/xlm-roberta-xxl",
                                          models__0__resources={"gpus": 1, "gpuMemoryGb": 16}),
     "models[0].resources"),
    ("offload without ZeRO", with_changes(models__0__resources={"gpus": 1, "zeroStage": 0, "offload": "optimizer"}),
     "models[0].resources.offload"),
    ("ZeRO stage 4", with_changes(models__0__resources={"gpus": 1, "zeroStage": 4}), "models[0].resources.zeroStage"),
    ("auto ZeRO without parameter count", with_changes(models__0__pretrained="/models/mine"),
     "models[0].parameters"),
    ("learning rate zero", with_changes(hyperparameters={"target": {"learningRate": 0}}),
     "hyperparameters.target.learningRate"),
    ("batch size a string", with_changes(hyperparameters={"intermediate": {"batchSize": "big"}}),
     "hyperparameters.intermediate.batchSize"),
    ("per-task override of an unknown task", with_changes(hyperparameters={"perTask": {"mlni": {"epochs": 1}}}),
     "hyperparameters.perTask.mlni"),
    ("per-model override of an unknown model", with_changes(hyperparameters={"perModel": {"xxl": {"epochs": 1}}}),
     "hyperparameters.perModel.xxl"),
    ("a stage's per-model override of an unknown model",
     with_changes(hyperparameters={"target": {"perModel": {"xxl": {"epochs": 1}}}}),
     "hyperparameters.target.perModel.xxl"),
    ("the other stage's per-model override of an unknown model",
     with_changes(hyperparameters={"intermediate": {"perModel": {"xxl": {"epochs": 1}}}}),
     "hyperparameters.intermediate.perModel.xxl"),
    ("group named baseline", with_changes(multiTaskGroups=[{"name": "baseline", "tasks": ["mnli", "qqp"]}]),
     "multiTaskGroups[0].name"),
    ("group of one task", with_changes(multiTaskGroups=[{"name": "g", "tasks": ["mnli"]}]), "multiTaskGroups[0].tasks"),
    ("group with a target task", with_changes(multiTaskGroups=[{"name": "g", "tasks": ["mnli", "pawsx"]}]),
     "multiTaskGroups[0].tasks[1]"),
    ("group name clashes with a task", with_changes(multiTaskGroups=[{"name": "mnli", "tasks": ["qqp", "ccg"]}]),
     "multiTaskGroups"),
    ("namespace with capitals", with_changes(cluster={"namespace": "Research"}), "cluster.namespace"),
    ("secret given as a value", with_changes(cluster={"secrets": {"hfToken": "hf_AbC123 secret"}}),
     "cluster.secrets.hfToken"),
    ("storage path traversal", with_changes(cluster={"storage": {"mountPath": "/data/../etc"}}),
     "cluster.storage.mountPath"),
    ("data path traversal", with_changes(data={"mnli": "../../etc"}), "data.mnli"),
    ("image with a shell character", with_changes(cluster={"image": "repo/img;rm -rf /"}), "cluster.image"),
    ("maxParallel zero", with_changes(cluster={"maxParallel": 0}), "cluster.maxParallel"),
    ("eval language not in target", with_changes(evalLanguages={"xnli": ["ja"]}), "evalLanguages.xnli"),
    ("grid over the run limit", with_changes(seeds=list(range(100)), planning={"maxRuns": 50}), "planning.maxRuns"),
    ("local-only task without data", with_changes(intermediateTasks=["ccg"]), "data.ccg"),
    ("local-only task in a group without data",
     with_changes(multiTaskGroups=[{"name": "mix", "tasks": ["mnli", "ccg"]}]), "data.ccg"),
]


@pytest.mark.parametrize(("case", "document", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_exits_2_naming_the_field(tmp_path: Path, case: str, document: object, field: str) -> None:
    code, output = validate(tmp_path, document)
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip().startswith("- ")]
    assert lines, output
    assert any(line.strip().removeprefix("- ").startswith(f"{field}:") for line in lines), output


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    code, output = validate(tmp_path, with_changes(name="Bad Name", targets=["nope"], seeds=[-1]))
    assert code == 2
    for field in ("name:", "targets[0]:", "seeds[0]:"):
        assert field in output, output


def test_object_form_errors_name_the_spec_path(tmp_path: Path) -> None:
    obj = {"apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "mini"},
           "spec": with_changes(targets=["nope"])}
    code, output = validate(tmp_path, obj)
    assert code == 2 and "spec.targets[0]:" in output


def test_messages_say_what_would_be_valid() -> None:
    with pytest.raises(SpecError) as e:
        parse_document(with_changes(targets=["xnl"]))
    assert "xnli" in e.value.problems[0] and "pawsx" in e.value.problems[0]


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "name: [unclosed", "just a string"])
def test_documents_that_are_not_specs(tmp_path: Path, text: str) -> None:
    code, output = validate(tmp_path, text)
    assert code == 2 and "Traceback" not in output


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read" in result.output


def test_wrong_kind_is_rejected() -> None:
    with pytest.raises(SpecError, match="apiVersion/kind"):
        load_spec_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")


def test_auto_zero_picks_the_least_partitioned_stage_that_fits() -> None:
    spec = parse_document(with_changes(models=[
        {"name": "base", "pretrained": "FacebookAI/xlm-roberta-base", "resources": {"gpus": 1}},
        {"name": "xl", "pretrained": "facebook/xlm-roberta-xl", "resources": {"gpus": 8}},
        {"name": "xxl", "pretrained": "facebook/xlm-roberta-xxl", "resources": {"gpus": 8, "nodes": 2}},
        {"name": "xl1", "pretrained": "/models/xlm-roberta-xl", "parameters": 3_480_000_000,
         "resources": {"gpus": 1}},
    ]))
    chosen = {m.name: (m.deepspeed().zero_stage, m.deepspeed().offload) for m in spec.models}
    # 16 B/param on 80 GB with 60% for model states (48 GiB): base 4.4 GB fits plainly;
    # XL 56 GB does not, but ZeRO-2 over 8 GPUs (2N + 14N/8 = 13 GB) does; XXL over 16 GPUs
    # needs 2N + 14N/16 = 31 GB with ZeRO-2; XL on one GPU needs optimizer offload.
    assert chosen == {"base": (0, "none"), "xl": (2, "none"), "xxl": (2, "none"), "xl1": (3, "optimizer")}


@pytest.mark.parametrize("value", ["hx\n", "a/b\n", "ok\n"])
def test_a_trailing_newline_is_never_a_valid_name(value: str) -> None:
    """`$` in Python's re matches before a final newline; names must match in full."""
    from xstilts.operator.experiment.spec import dns_label, label_key

    with pytest.raises(ValueError, match="not a"):
        dns_label(value)
    with pytest.raises(ValueError, match="not a label key"):
        label_key(value.replace("a/b", "nvidia.com\n/gpu"))


@pytest.mark.parametrize(("field", "value"), [("gpus", 2.0), ("gpus", "1"), ("gpus", True), ("nodes", "2"),
                                              ("cpu", "0"), ("cpu", "0.0m"), ("memory", "0"), ("memory", "0Gi")])
def test_resources_reject_loose_counts_and_zero_requests(field: str, value: object) -> None:
    from pydantic import ValidationError
    from xstilts.operator.experiment.spec import ModelResources

    with pytest.raises(ValidationError) as err:
        ModelResources.model_validate({field: value})
    assert err.value.errors()[0]["loc"] == (field,)
    ModelResources.model_validate({field: {"gpus": 2, "nodes": 2, "cpu": "500m", "memory": "1Gi"}[field]})


@pytest.mark.parametrize("command", [
    ["submit", str(Path(__file__).parents[2] / "examples" / "demo.yaml"), "--dry-run"], ["status", "x"]])
def test_a_bad_namespace_option_exits_2_naming_it(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "-n", "BAD NS!"])
    assert result.exit_code == 2
    assert "--namespace" in result.output and "not a valid name" in result.output


def test_a_duplicate_yaml_key_is_rejected_not_resolved() -> None:
    with pytest.raises(SpecError) as err:
        load_spec_text("name: a\nname: b\n")
    assert "duplicate key 'name'" in " ".join(err.value.problems)


def test_local_only_task_with_its_data_validates(tmp_path: Path) -> None:
    code, output = validate(tmp_path, with_changes(intermediateTasks=["ccg"], data={"ccg": "corpora/ccg"}))
    assert code == 0, output
