"""The CRD is a valid apiextensions.k8s.io/v1 object by the official schemas, and every example
in object form validates against its openAPIV3Schema."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator
from xstilts.operator.cluster.crd import crd
from xstilts.operator.experiment.spec import load_spec_text, parse_document, to_object

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def schema() -> dict:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_is_valid_against_the_official_kubernetes_schema() -> None:
    kubernetes_validate.validate(crd(), "1.33", strict=True)
    kubernetes_validate.validate(crd(), "1.37", strict=True)


def test_crd_schema_is_structural() -> None:
    text = yaml.safe_dump(crd())
    assert "$ref" not in text and "$defs" not in text and "const" not in text
    assert "title:" not in text


def test_crd_has_status_subresource_and_printer_columns() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and "Age" in columns


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_in_object_form_validate_against_the_crd_schema(example: Path) -> None:
    spec = load_spec_text(example.read_text(), example.name)
    raw = yaml.safe_load(example.read_text())
    for document in (raw if raw.get("kind") else to_object(spec), to_object(spec)):
        OAS30Validator(schema()).validate(document)


def test_the_readmes_kubectl_example_is_an_experiment_object() -> None:
    """`kubectl apply -f` needs apiVersion and kind: the README's object must have them, pass the
    spec's validation and the CRD's schema."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: Experiment" in b]
    assert blocks, "README.md shows no Experiment object for kubectl apply"
    for document in blocks:
        assert document["apiVersion"] == "xstilts.dev/v1alpha1" and document["kind"] == "Experiment"
        assert parse_document(document).name == document["metadata"]["name"]
        OAS30Validator(schema()).validate(document)


@pytest.mark.parametrize(("path", "value"), [
    (("targets",), ["no-such-target"]),
    (("name",), "Not_DNS"),
    (("models", 0, "resources", "gpus"), -1),
    (("seeds",), []),
    (("modles",), []),
])
def test_crd_schema_rejects_what_the_spec_rejects(path: tuple, value: object) -> None:
    document = to_object(load_spec_text((EXAMPLES[0]).read_text()))
    node = document["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    validator = OAS30Validator({**schema(), "properties": {**schema()["properties"],
                                "spec": _closed(schema()["properties"]["spec"])}})
    assert list(validator.iter_errors(document))


def _closed(node: object) -> object:
    """The API server rejects unknown fields (kubectl's strict field validation); mimic it."""
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


def test_cli_prints_the_same_crd() -> None:
    out = subprocess.run([sys.executable, "-m", "xstilts.operator.cli", "crd"], capture_output=True,
                         text=True, check=True).stdout
    assert yaml.safe_load(out) == crd()


def test_core_imports_no_torch() -> None:
    code = ("import sys, xstilts.operator.cli, xstilts.operator.experiment.plan, xstilts.operator.cluster.crd, "
            "xstilts.trainer.config, xstilts.trainer.tasks; "
            "bad = [m for m in ('torch', 'transformers', 'deepspeed', 'mlflow', 'datasets') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _properties(node: dict, path: str = "spec"):
    for name, sub in (node.get("properties") or {}).items():
        yield f"{path}.{name}", sub
        yield from _properties(sub, f"{path}.{name}")
        if isinstance(sub.get("items"), dict):
            yield from _properties(sub["items"], f"{path}.{name}[]")


def test_every_spec_field_has_a_description_for_kubectl_explain() -> None:
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    fields = dict(_properties(spec))
    assert len(fields) > 100
    assert [path for path, node in fields.items() if not node.get("description")] == []
    assert all("\n" not in node["description"] for node in fields.values())
    zero = fields["spec.models[].resources.zeroStage"]  # int-or-string, and keeps its enum
    assert zero["x-kubernetes-int-or-string"] and zero["enum"] == [0, 1, 2, 3, "auto"]
    assert "an integer or a string" in zero["description"]
