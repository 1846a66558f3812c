"""Secrets only by reference: a spec names Secrets, never holds their values; render turns the
names into secretKeyRef / secretRef and nothing else; and a secret value present where a run
really executes (HF_TOKEN, MLFLOW_TRACKING_PASSWORD and AWS_SECRET_ACCESS_KEY in its
environment, as the kubelet would inject them from the Secrets) never appears in anything the
run produces: its log, config.json, progress.json, result.json, checkpoints, MLflow params,
tags, metrics and artifacts, the MLflow server's own store and log, nor in any object or output
of plan / render / submit --dry-run.

The check is a grep for a planted value over every byte, plus the forms a value takes on the
way: base64 (HTTP basic auth carries `user:password` so) and URL-quoted.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from fixtures.mlflow_server import MlflowServer
from fixtures.tiny_hub import TinyHub
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.cluster.render import render_experiment
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import SpecError, parse_document, to_object

PLANTED = "planted-secret-XYZ-7f3a9c"
MLFLOW_USER = "xstilts-bot"
# The Secrets a cluster would hold (created by an administrator, never by xstilts); their
# values are what must never surface.
SECRETS: list[dict[str, Any]] = [
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": PLANTED}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mlflow-credentials"},
     "stringData": {"MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": PLANTED}},
    {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
     "stringData": {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": PLANTED}},
]
SECRET_ENV = {"HF_TOKEN": PLANTED, "MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": PLANTED,
              "AWS_SECRET_ACCESS_KEY": PLANTED}
SENSITIVE_ENV_WORDS = ("TOKEN", "PASSWORD", "SECRET", "ACCESS_KEY", "CREDENTIAL")


def planted_forms() -> list[bytes]:
    """The planted value as it could appear: plain, URL-quoted, and base64 of the basic-auth
    pair at each of the three alignments (a substring of a longer base64 text)."""
    pair = f"{MLFLOW_USER}:{PLANTED}".encode()
    forms = {PLANTED.encode(), quote(PLANTED).encode()}
    for shift in range(3):
        encoded = base64.b64encode(b"x" * shift + pair)
        forms.add(encoded[4:-4])  # the middle, independent of what surrounds it
    return sorted(forms)


def leaks(data: bytes) -> list[bytes]:
    return [form for form in planted_forms() if form in data]


def cluster_spec() -> dict[str, Any]:
    return {
        "name": "secrets",
        "models": [{"name": "base", "pretrained": "FacebookAI/xlm-roberta-base", "resources": {"gpus": 1}},
                   {"name": "xxl", "pretrained": "facebook/xlm-roberta-xxl",
                    "resources": {"gpus": 8, "nodes": 2, "zeroStage": 3}}],
        "intermediateTasks": ["mnli"],
        "targets": ["xnli"],
        "mlflow": {"trackingUri": "https://mlflow.example.org"},
        "cluster": {"namespace": "research", "queue": "gpu",
                    "secrets": {"hfToken": "hf-token", "mlflow": "mlflow-credentials", "s3": "s3-credentials"}},
    }


# --- the spec and what render makes of it -----------------------------------------------------


def test_render_references_each_secret_by_name_only(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)  # whatever the operator's own environment holds stays there
    spec = parse_document(cluster_spec())
    objects = render_experiment(plan(spec), spec)
    assert objects and "Secret" not in {o["kind"] for o in objects}
    names = {s["metadata"]["name"] for s in SECRETS}
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert {o["metadata"]["labels"]["xstilts.dev/model"] for o in jobs} == {"base", "xxl"}
    for job in jobs:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token",
                                                                                     "key": "token"}}}
        assert container["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}},
                                        {"secretRef": {"name": "s3-credentials"}}]
        for e in container["env"]:
            if any(word in e["name"] for word in SENSITIVE_ENV_WORDS):
                assert "value" not in e, f"{e['name']} has a literal value"
            referenced = e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
            assert referenced is None or referenced in names
        metadata = json.dumps([job["metadata"], job["spec"]["template"]["metadata"]])
        assert not any(name in metadata for name in names), "a Secret name in labels or annotations"
    dumped = json.dumps([to_object(spec), *objects]).encode()
    assert leaks(dumped) == []


def test_cli_outputs_hold_no_secret_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(cluster_spec()))
    runner = CliRunner()
    for command in (["validate", str(path)], ["plan", str(path), "--output", "json", "--configs"],
                    ["submit", str(path), "--dry-run"], ["submit", str(path), "--dry-run", "--no-controller"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
        assert leaks(result.output.encode()) == [], command
    jobs = [o for o in yaml.safe_load_all(runner.invoke(app, ["submit", str(path), "--dry-run", "--no-controller"])
                                          .output) if o and o["kind"] == "Job"]
    assert jobs and all("secretRef" in json.dumps(j) for j in jobs)


@pytest.mark.parametrize(("field", "value"), [
    (("cluster", "secrets", "hfToken"), f"hf_{PLANTED}"),
    (("cluster", "secrets", "mlflow"), f"{MLFLOW_USER}:{PLANTED}"),
    (("cluster", "secrets", "s3"), f"AKIAEXAMPLE/{PLANTED}"),
])
def test_a_secret_value_in_the_spec_is_rejected_without_repeating_it(field: tuple[str, ...], value: str) -> None:
    doc = cluster_spec()
    node = doc
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    assert e.value.problems[0].startswith(".".join(field) + ":"), e.value.problems
    assert leaks(str(e.value).encode()) == [], e.value.problems


@pytest.mark.parametrize("uri", [f"https://{MLFLOW_USER}:{PLANTED}@mlflow.example.org",
                                 f"postgresql://mlflow:{PLANTED}@db:5432/mlflow"])
def test_a_password_in_the_tracking_uri_is_rejected(uri: str) -> None:
    doc = cluster_spec()
    doc["mlflow"]["trackingUri"] = uri
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    assert e.value.problems[0].startswith("mlflow.trackingUri:") and "cluster.secrets.mlflow" in str(e.value)
    assert leaks(str(e.value).encode()) == [], e.value.problems


def test_errors_never_repeat_the_credentials_of_a_uri() -> None:
    doc = cluster_spec()
    doc["mlflow"]["trackingUri"] = f"ftp://{MLFLOW_USER}:{PLANTED}@mlflow.example.org"  # wrong scheme
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    assert e.value.problems[0].startswith("mlflow.trackingUri:")
    assert leaks(str(e.value).encode()) == [] and "//***@" in str(e.value)


# --- a real run with the secrets in its environment -------------------------------------------


def every_file(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file())


@pytest.mark.slow  # a real tiny training run with a real MLflow server: about 30 s on 2 cores
def test_a_planted_secret_never_reaches_anything_a_run_produces(
        tiny_hub: TinyHub, tiny_cache: Path, mlflow_server: MlflowServer, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from xstilts.trainer.rundir import RunDir

    experiment = f"secrets-{tmp_path.name[-12:]}".lower().replace("_", "-")
    spec_path = tmp_path / "spec.yaml"
    stage = {"learningRate": 1e-3, "batchSize": 8, "maxSteps": 4, "maxSeqLength": 64, "maxEvalExamples": 16}
    spec_path.write_text(yaml.safe_dump({
        "name": "secrets",
        "models": [{"name": "tiny", "pretrained": str(tiny_hub.model), "parameters": 80000, "resources": {"gpus": 0}}],
        "targets": ["pawsx"],
        "evalLanguages": {"pawsx": ["en", "de"]},
        "data": {"pawsx": str(tiny_hub.data["pawsx"])},
        "hyperparameters": {"target": stage},
        "mlflow": {"experimentName": experiment},
        "cluster": {"secrets": {"hfToken": "hf-token", "mlflow": "mlflow-credentials"}},
    }))
    out = tmp_path / "out"
    # The run's environment as the kubelet builds it from the Secrets the Job references; with
    # a username and password set, the MLflow client sends them (basic auth) on every request.
    env = {**os.environ, **SECRET_ENV}
    done = subprocess.run([sys.executable, "-m", "xstilts.operator.cli", "run", str(spec_path), "--output-dir",
                           str(out), "--tracking-uri", mlflow_server.uri], cwd=tmp_path, env=env,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert leaks(done.stdout + done.stderr) == []

    produced = every_file(out)
    names = {p.name for p in produced}
    assert {RunDir.TRAIN_LOG, RunDir.CONFIG, RunDir.PROGRESS, RunDir.RESULT} <= names, names
    assert any(p.suffix == ".safetensors" for p in produced), "no checkpoint written"
    for path in [*produced, *every_file(mlflow_server.root)]:
        assert leaks(path.read_bytes()) == [], f"the planted secret is in {path}"

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) >= 2, "the experiment's parent run and the training run"
    trained = [r for r in runs if r.data.metrics]
    assert trained, "no run logged metrics"
    for run in runs:
        record = json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics,
                             "name": run.info.run_name}).encode()
        assert leaks(record) == [], run.info.run_id
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            assert leaks(json.dumps([(m.key, m.value, m.step) for m in history]).encode()) == []
        downloaded = tmp_path / "artifacts" / run.info.run_id
        downloaded.mkdir(parents=True)
        if client.list_artifacts(run.info.run_id):
            client.download_artifacts(run.info.run_id, "", str(downloaded))
        for path in every_file(downloaded):
            assert leaks(path.read_bytes()) == [], f"the planted secret is in artifact {path}"
    assert any(every_file(tmp_path / "artifacts")), "no artifact was logged to check"


def test_the_grep_finds_the_value_in_each_form_it_travels_in() -> None:
    header = b"Authorization: Basic " + base64.b64encode(f"{MLFLOW_USER}:{PLANTED}".encode())
    for carrier in (PLANTED.encode(), quote(PLANTED).encode(), header, json.dumps({"p": PLANTED}).encode()):
        assert leaks(b"prefix " + carrier + b" suffix"), carrier
    assert leaks(b"planted-secret-XYZ") == []
