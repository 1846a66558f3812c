"""The Experiment CustomResourceDefinition, its openAPIV3Schema generated from ExperimentSpec
(pure). The API server then rejects a malformed Experiment at `kubectl apply` time, before the
controller ever sees it.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema: no
$ref, no title/default/const, nullable instead of `anyOf [X, null]`, boolean
exclusiveMinimum, and int-or-string written the Kubernetes way.
"""

from __future__ import annotations

from typing import Any

from xstilts.operator.experiment.spec import API_GROUP, KIND, ExperimentSpec

PLURAL = "experiments"
VERSION = "v1alpha1"

# Status fields the controller writes (reconcile.py makes all but observedGeneration);
# printer columns read them.
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "phase": {"type": "string", "enum": ["Pending", "Running", "Degraded", "Succeeded", "Failed",
                                                       "PartiallyFailed"]},
        "observedGeneration": {"type": "integer"},
        "counts": {
            "type": "object",
            "description": "runs per state; pending + running + succeeded + failed + blocked = total",
            "properties": {key: {"type": "integer", "minimum": 0}
                           for key in ("total", "pending", "running", "succeeded", "failed", "blocked")},
        },
        "gpuHoursEstimated": {"type": "number"},
        "gpuHoursUsed": {"type": "number"},
        "bestGain": {"type": "string", "description": "largest mean gain so far, e.g. '+3.1 xnli/mnli@large'"},
        "replication": {
            "type": "object",
            "description": "with spec.replication: per cell (model/intermediate/target), its seeds so far, the"
                           " half-width of its paired gain interval in points, and whether it reached the target",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "seeds": {"type": "integer", "minimum": 0},
                    "halfWidth": {"type": "number"},
                    "state": {"type": "string",
                              "enum": ["measuring", "addingSeeds", "reached", "stoppedAtMaxSeeds"]},
                },
            },
        },
        "learningRateSearch": {
            "type": "object",
            "description": "with hyperparameters.intermediate.search: per model/intermediate arm, the phase-2"
                           " learning rate selected on English dev, or state 'searching' until every candidate"
                           " has its result or failed, 'failed' when every candidate failed",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "learningRate": {"type": "number"},
                    "state": {"type": "string", "enum": ["searching", "failed"]},
                },
            },
        },
        "mlflowExperiment": {"type": "string", "description": "the MLflow experiment name"},
        "mlflowTrackingUri": {"type": "string"},
        "message": {"type": "string"},
        "failures": {
            "type": "object",
            "description": "run id -> why it failed",
            "additionalProperties": {"type": "string"},
        },
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                },
            },
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "runs": {
            "type": "object",
            "description": ("run id -> waiting, queued, creating, pending, running, finishing, succeeded,"
                            " failed or blocked; past 5,000 runs (runsSummarised) only the failed runs"),
            "additionalProperties": {"type": "string"},
        },
        "runStates": {
            "type": "object",
            "description": "how many runs are in each state of `runs`",
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
        "runsSummarised": {"type": "boolean",
                           "description": "true past 5,000 runs: `runs` lists only the failed runs"},
    },
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Runs", "type": "integer", "jsonPath": ".status.counts.total"},
    {"name": "Succeeded", "type": "integer", "jsonPath": ".status.counts.succeeded"},
    {"name": "Running", "type": "integer", "jsonPath": ".status.counts.running"},
    {"name": "Failed", "type": "integer", "jsonPath": ".status.counts.failed"},
    {"name": "GPU-h", "type": "number", "jsonPath": ".status.gpuHoursUsed"},
    {"name": "Best-Gain", "type": "string", "jsonPath": ".status.bestGain", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def spec_schema() -> dict[str, Any]:
    raw = ExperimentSpec.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    schema: dict[str, Any] = _structural(raw, definitions)
    return schema


def _structural(node: Any, definitions: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(n, definitions) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, definitions)
    for options_key in ("anyOf", "oneOf"):
        if options_key in node:
            options = node[options_key]
            non_null = [o for o in options if o.get("type") != "null"]
            rest = {k: v for k, v in node.items() if k != options_key}
            if len(non_null) == 1:  # Optional[X]
                optional = _structural({**non_null[0], **rest}, definitions)
                optional["nullable"] = True
                return optional
            return _int_or_string(rest, definitions)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "default", "examples"):
            continue
        if key == "additionalProperties" and value is False:
            continue  # structural schemas prune unknown fields; kubectl's strict validation rejects them
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: _structural(sub, definitions) for name, sub in value.items()}
        elif key == "description" and isinstance(value, str):
            out[key] = " ".join(value.split())  # a docstring's line breaks are not the reader's
        else:
            out[key] = _structural(value, definitions)
    if "enum" in out and "type" not in out:
        kinds = {type(v) for v in out["enum"]}
        if kinds == {str}:
            out["type"] = "string"
        elif kinds <= {int}:
            out["type"] = "integer"
        else:  # Literal[0, 1, 2, 3, "auto"]: the enum stays, the API server checks it
            return _int_or_string(out, definitions)
    return out


def _int_or_string(rest: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    out = {k: _structural(v, definitions) for k, v in rest.items() if k not in ("title", "default", "type")}
    out["x-kubernetes-int-or-string"] = True
    out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    out.setdefault("description", "an integer or a string")
    return out


def crd() -> dict[str, Any]:
    schema = spec_schema()
    schema.pop("description", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["xexp"],
                "categories": ["xstilts"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An xstilts scaling study: models × intermediate tasks × targets × seeds.",
                            "required": ["spec"],
                            "x-kubernetes-validations": [{
                                "rule": "self.metadata.name == self.spec.name",
                                "message": "metadata.name must equal spec.name",
                            }],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": schema,
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }
