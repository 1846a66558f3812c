"""Hostile input, one test per class of defect: every spec gets a clear answer (exit code 2,
the field named, no traceback) quickly and within bounded memory."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.experiment.plan import plan
from xstilts.operator.experiment.spec import (
    MAX_PROBLEMS,
    MAX_RUNS,
    MAX_SPEC_BYTES,
    SpecError,
    load_spec_text,
    parse_document,
)

runner = CliRunner()


def spec(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"name": "hx", "models": [{"name": "base", "pretrained": "FacebookAI/xlm-roberta-base"}],
                           "intermediateTasks": ["mnli"], "targets": ["xnli"], "seeds": [1]}
    doc.update(changes)
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_document(doc)
    return e.value.problems


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The installed command in its own process: exit code, output and the memory it took.

    The peak is VmHWM, the high-water mark of this process's own address space: exec starts it
    afresh, unlike ru_maxrss, which Linux carries over from the (large) pytest parent."""
    code = ("import sys; from xstilts.operator.cli import main; sys.argv = ['xstilts', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n"
            "    hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
            "    print(f'maxrss_kb={hwm.split()[1]}', file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def maxrss_mb(result: subprocess.CompletedProcess[str]) -> float:
    return int(result.stderr.rsplit("maxrss_kb=", 1)[1]) / 1024


# --- bounds ----------------------------------------------------------------------------------


def test_an_endless_or_huge_spec_file_is_refused_after_the_size_cap() -> None:
    start = time.monotonic()
    result = cli("validate", "/dev/zero")
    assert result.returncode == 2, result.stderr
    assert f"larger than {MAX_SPEC_BYTES:,} bytes" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - start < 5 and maxrss_mb(result) < 500


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    lines, previous = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a"
    for anchor in "bcdefghi":
        lines.append(f"{anchor}: &{anchor} [{', '.join([f'*{previous}'] * 9)}]")
        previous = anchor
    for field in ("apiVersion", "name", "seeds"):
        path = tmp_path / f"{field}.yaml"
        path.write_text("\n".join([*lines, f"{field}: *i"]) + "\n")
        start = time.monotonic()
        result = cli("validate", str(path))
        assert result.returncode == 2 and "once its aliases are expanded" in result.stderr, result.stderr
        assert time.monotonic() - start < 5 and maxrss_mb(result) < 500
    with pytest.raises(SpecError, match="refers to its own anchor"):
        load_spec_text("name: hx\nmodels: &m [*m]\n")


def test_a_spec_text_over_the_size_cap_is_refused() -> None:
    with pytest.raises(SpecError, match="more than a spec may hold"):
        load_spec_text("#" * (MAX_SPEC_BYTES + 1))


def test_runs_per_experiment_are_capped_where_the_controller_can_hold_the_plan() -> None:
    assert any(line.startswith("planning.maxRuns: ") for line in problems(spec(planning={"maxRuns": MAX_RUNS + 1})))


@pytest.mark.slow
def test_a_plan_at_the_runs_cap_fits_in_time_and_memory() -> None:
    """The measurement behind MAX_RUNS: the largest plan allowed, in one process."""
    doc = spec(seeds=list(range(MAX_RUNS // 3)), planning={"maxRuns": MAX_RUNS})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    p = plan(parse_document(doc))
    elapsed = time.monotonic() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(p.runs) == MAX_RUNS // 3 * 3
    assert elapsed < 10 and grown_mb < 200, (elapsed, grown_mb)


def test_problems_are_capped_and_counted() -> None:
    lines = problems(spec(seeds=["x"] * 10_000))
    assert len(lines) == MAX_PROBLEMS + 1 and lines[-1] == f"... and {10_000 - MAX_PROBLEMS:,} more problems"


def test_a_huge_integer_gets_a_plain_message() -> None:
    with pytest.raises(SpecError) as e:
        load_spec_text("name: hx\nseeds: [" + "9" * 5000 + "]\n")
    assert e.value.problems == ["<document>: cannot be read: a number has too many digits"]
    lines = problems(spec(seeds=[10**1000]))
    assert lines == ["seeds[0]: Input should be less than or equal to 2147483647 (got an integer of 1001 digits)"]
    assert "set_int_max_str_digits" not in " ".join(problems(spec(seeds=[10**5000])))


# --- the command line itself -----------------------------------------------------------------


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["submit", "--dry-run", "--no-controller"],
                                     ["status", "x", "--kubeconfig"]])
def test_rich_markup_in_a_path_is_printed_as_text(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "a[/red]ok[bold].yaml"
    result = runner.invoke(app, [*command, str(path)])
    assert result.exit_code in (1, 2) and isinstance(result.exception, SystemExit), result.exception
    assert "a[/red]ok[bold].yaml" in result.output.replace("\n", "")


# --- credentials only by reference -----------------------------------------------------------

TOKEN = "s3cr3tT0ken"


@pytest.mark.parametrize("uri", [
    f"https://{TOKEN}@mlflow.example.org", f"https://user:{TOKEN}@mlflow.example.org",
    f"https://user:pass word{TOKEN}@mlflow.example.org", f"http://mlflow:5000/?password={TOKEN}",
    f"https://mlflow/api?x=1&access_token={TOKEN}", f"https://mlflow/?API_KEY={TOKEN}",
    f"postgresql://mlflow:{TOKEN}@db/mlflow", f"https://mlflow/?X-Amz-Signature={TOKEN}",
])
def test_a_credential_in_the_tracking_uri_is_refused_naming_the_secret_field(uri: str) -> None:
    lines = problems(spec(mlflow={"trackingUri": uri}))
    assert len(lines) == 1 and lines[0].startswith("mlflow.trackingUri: "), lines
    assert TOKEN not in lines[0]
    assert "cluster.secrets.mlflow" in lines[0] or "should match pattern" in lines[0]


@pytest.mark.parametrize("uri", ["https://mlflow.example.org:5000", "http://mlflow/?sslmode=require",
                                 "file:///data/mlruns", "databricks://profile"])
def test_a_tracking_uri_without_credentials_is_accepted(uri: str) -> None:
    assert parse_document(spec(mlflow={"trackingUri": uri})).mlflow.tracking_uri == uri


@pytest.mark.parametrize(("field", "holds"), [("hfToken", "HF_TOKEN"), ("mlflow", "MLFLOW_TRACKING_PASSWORD"),
                                              ("s3", "AWS_SECRET_ACCESS_KEY")])
@pytest.mark.parametrize("value", ["hf_AbCdEf0123456789", "ghp_" + TOKEN, "Bearer " + TOKEN, "x" * 300])
def test_a_token_pasted_into_a_secret_reference_is_refused_without_echoing_it(field: str, holds: str,
                                                                              value: str) -> None:
    lines = problems(spec(cluster={"secrets": {field: value}}))
    assert len(lines) == 1 and lines[0].startswith(f"cluster.secrets.{field}: "), lines
    assert value not in lines[0] and holds in lines[0]


# --- messages and agreement ------------------------------------------------------------------


def test_cross_field_problems_are_reported_alongside_field_errors() -> None:
    lines = problems(spec(seeds="x", models=[{"name": "a", "pretrained": "x/a", "parameters": 1},
                                             {"name": "b", "pretrained": "x/a", "parameters": 1}],
                          evalLanguages={"pawsx": ["en"]}, hyperparameters={"perTask": {2: {}}}))
    assert "seeds: Input should be a valid list (got 'x')" in lines
    assert "hyperparameters.perTask[2]: the key: Input should be a valid string (got 2)" in lines
    assert any(line.startswith("models: duplicate pretrained model 'x/a'") for line in lines)
    assert any(line.startswith("evalLanguages.pawsx: ") for line in lines)


@pytest.mark.parametrize(("changes", "field"), [
    ({"data": {"mnli": "/a/../b"}}, "data.mnli"), ({"data": {"squad_v2": "/d"}}, "data.squad_v2"),
    ({"models": [{"name": "a", "pretrained": "org/base/"}]}, "models[0].pretrained"),
    ({"multiTaskGroups": [{"name": "g1", "tasks": ["mnli", "qqp"]}, {"name": "g2", "tasks": ["qqp", "mnli"]}]},
     "multiTaskGroups"),
    ({"cluster": {"ttlSecondsAfterFinished": 99999999999}}, "cluster.ttlSecondsAfterFinished"),
    ({"cluster": {"image": "a:b:c"}}, "cluster.image"),
    ({"cluster": {"storage": {"pvc": "x", "mountPath": "/etc"}}}, "cluster.storage.mountPath"),
    ({"models": [{"name": "a", "pretrained": "x/a", "parameters": 1, "resources": {"zeroStage": True}}]},
     "models[0].resources.zeroStage"),
])
def test_quiet_wrong_accepts_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    assert any(line.startswith(f"{field}:") for line in problems(spec(**changes))), problems(spec(**changes))
