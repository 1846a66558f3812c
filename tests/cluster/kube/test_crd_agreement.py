"""The CRD, checked by the real kube-apiserver, and pydantic agree on hostile specs: each
mutation of a valid Experiment is accepted by both or refused by both."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from kube_cluster import ApiError
from xstilts.operator.cluster.crd import crd
from xstilts.operator.experiment.spec import (
    OBJECT_STORAGE_REFUSED,
    SpecError,
    load_spec_text,
    parse_document,
    to_object,
)

BASE = to_object(load_spec_text((Path(__file__).resolve().parents[3] / "examples" / "phang2020.yaml").read_text()),
                 "default")
MUTATIONS: list[tuple[tuple[Any, ...], Any]] = [
    ((), None), (("models", 0, "resources", "zeroStage"), 4), (("models", 0, "resources", "zeroStage"), "3"),
    (("models", 0, "resources", "zeroStage"), True), (("models", 0, "resources", "gpus"), 2.0),
    (("models", 0, "resources", "gpus"), "1"), (("seeds",), [1, 1]), (("seeds",), [2**63]),
    (("data",), {"mnli": "/a/../b"}), (("data",), {"squad_v2": "/a/b"}),
    (("cluster", "storage"), {"pvc": "x", "mountPath": "/etc"}),
    (("cluster", "storage"), {"pvc": "x", "mountPath": "/mnt/r"}),
    (("cluster", "storage"), {"pvc": "x", "uri": "s3://bucket/x"}), (("cluster", "storage"), {"uri": "s3://b/x"}),
    (("cluster", "storage"), {"pvc": "x", "uri": None}), (("hyperparameters", "perModel"), {"nope": {}}),
    (("hyperparameters", "target", "perModel"), {"nope": {}}),
    (("hyperparameters", "target", "perModel"), {"large": {"epochs": 1}}),
    (("hyperparameters", "intermediate", "perModel"), {"nope": {}}),
    (("hyperparameters", "perTask"), {"nope": {}}), (("evalLanguages",), {"xnli": ["klingon"]}),
    (("cluster", "ttlSecondsAfterFinished"), 99999999999), (("cluster", "queue"), "q\n"),
    (("cluster", "nodeSelector"), {"k\n": "v"}), (("cluster", "image"), "a:b:c"),
    (("mlflow", "trackingUri"), "https://tok@h"), (("mlflow", "trackingUri"), "https://h/?password=x"),
    (("cluster", "secrets"), {"hfToken": "hf_ABC"}), (("models", 0, "pretrained"), "org/base/"),
    (("multiTaskGroups",), [{"name": "g1", "tasks": ["mnli", "qqp"]}, {"name": "g2", "tasks": ["qqp", "mnli"]}]),
    (("planning", "maxRuns"), 1),
    # the variant arms (multiTaskGroups[1] is mnli-mlm, [2] mnli-translate-train)
    (("multiTaskGroups", 1, "mlm", "ratio"), 1.0), (("multiTaskGroups", 1, "mlm", "ratio"), 0.99),
    (("multiTaskGroups", 1, "mlm"), {"ratio": 0.2}), (("multiTaskGroups", 1, "mlm"), None),
    (("multiTaskGroups", 1, "tasks"), ["mnli", "qqp"]), (("multiTaskGroups", 2, "translateTrain"), ["en"]),
    (("multiTaskGroups", 2, "translateTrain"), ["de", "de"]), (("multiTaskGroups", 2, "translateTrain"), ["pt-BR"]),
    (("multiTaskGroups", 2, "translateTrain"), []), (("data",), {"ccg": "/data/ccgbank"}),
    (("multiTaskGroups", 1, "translateTrain"), ["de"]),
]
REMOVE = object()
# Edits of several top-level fields at once: replication (instead of seeds) counts every cell at
# maxSeeds against planning.maxRuns. Without its learning-rate search (which replication refuses)
# the example has 129 runs per seed (12 arms; 13 × 9 target runs).
REPLICATE = {"seeds": REMOVE, "hyperparameters": REMOVE, "replication": {"targetHalfWidth": 1.0}}
EDITS: list[dict[str, Any]] = [
    {**REPLICATE, "planning": {"maxRuns": 1290}},  # default maxSeeds 10: 1,290 runs, at the limit
    {**REPLICATE, "planning": {"maxRuns": 1289}},
    {**REPLICATE, "replication": {"targetHalfWidth": 1.0, "maxSeeds": 15}},  # 1,935 <= 2,000
    {**REPLICATE, "replication": {"targetHalfWidth": 1.0, "maxSeeds": 16}},  # 2,064 > 2,000
    {**REPLICATE, "replication": {"targetHalfWidth": 1.0, "minSeeds": 2, "maxSeeds": 2}},
    {"hyperparameters": REMOVE, "replication": {"targetHalfWidth": 1.0}},  # together with seeds
]


def mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    if path:
        node = doc["spec"]
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
        node[path[-1]] = value
    return doc


def edited(edits: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for key, value in edits.items():
        if value is REMOVE:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


@pytest.mark.slow
def test_the_crd_and_pydantic_agree_on_hostile_mutations(control_plane: Any) -> None:
    control_plane.apply(crd())
    control_plane.wait_for(lambda: control_plane.exists("/apis/xstilts.dev/v1alpha1/experiments"), timeout=60)
    disagreements = []
    cases = [((path, value), mutated(path, value)) for path, value in MUTATIONS]
    cases += [(edits, edited(edits)) for edits in EDITS]
    for case, doc in cases:
        try:
            parse_document(copy.deepcopy(doc))
            ours = True
        except SpecError:
            ours = False
        try:
            control_plane.api("POST", "/apis/xstilts.dev/v1alpha1/namespaces/default/experiments"
                              "?dryRun=All&fieldValidation=Strict", doc)
            theirs = True
        except ApiError:
            theirs = False
        if ours != theirs:
            disagreements.append((case, ours, theirs))
    assert not disagreements


@pytest.mark.slow
def test_the_api_server_refuses_object_storage_naming_the_field_and_the_fix(control_plane: Any) -> None:
    control_plane.apply(crd())
    control_plane.wait_for(lambda: control_plane.exists("/apis/xstilts.dev/v1alpha1/experiments"), timeout=60)
    with pytest.raises(ApiError) as refused:
        control_plane.api("POST", "/apis/xstilts.dev/v1alpha1/namespaces/default/experiments?dryRun=All",
                          mutated(("cluster", "storage"), {"uri": "s3://bucket/prefix"}))
    assert refused.value.status == 422
    assert "spec.cluster.storage.uri: Invalid value" in refused.value.body
    assert OBJECT_STORAGE_REFUSED in refused.value.body


@pytest.mark.slow
def test_kubectl_explain_describes_every_field(control_plane: Any) -> None:
    control_plane.apply(crd())

    def explained() -> str | None:
        out = control_plane.kubectl("explain", "experiment.spec.models.resources", check=False)
        return out.stdout if out.returncode == 0 and "zeroStage" in out.stdout else None

    text = control_plane.wait_for(explained, timeout=60, what="kubectl explain")
    assert "<no description>" not in text, text
    assert "DeepSpeed ZeRO stage" in text and "GPUs per node" in text
    whole = control_plane.kubectl("explain", "experiment.spec", "--recursive").stdout
    assert "<no description>" not in control_plane.kubectl("explain", "experiment.spec.cluster").stdout
    assert "maxParallel" in whole
