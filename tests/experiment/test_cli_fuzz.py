"""The CLI fuzzed (hypothesis): random bytes, random YAML, and valid specs with one mutation,
through `xstilts validate` and `xstilts plan`. Whatever the file holds, the answer is exit 0 for a
spec that parses, else exit 2 with a message naming the field (`  - path: ...`) or the file-level
problem (`error: cannot read FILE: ...`), never a traceback, and within a time bound.

In process (CliRunner) for speed; a few cases through the installed entry point in a subprocess.
The time bound is generous (5 s a call, where a call takes milliseconds) so that a loaded
machine does not make it flaky; the larger runs are marked slow.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from experiment.test_fuzz_inputs import PROBLEM, mutate, nodes, replace, wrong_type
from experiment.test_spec_properties import valid_specs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from xstilts.operator.cli import app
from xstilts.operator.experiment.spec import SpecError, load_spec_text

BOUND_SECONDS = 5.0
runner = CliRunner()

# YAML's own syntax, to build texts that stress the reader rather than the spec: anchors,
# aliases, tags (those that would build Python objects included), flow and block collections,
# directives, several documents, odd scalars.
TOKENS = ["name: x", "models:", "- ", "  ", "\n", ": ", "[", "]", "{", "}", ",", "&a ", "*a", "&b [*a, *a]",
          "!!python/object/apply:os.system ['id']", "!!binary aGk=", "!!str", "!!int 0x1F", "!!float .inf",
          "!custom", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "? ", "|\n", ">-\n", "'", '"',
          "#", "~", "null", "yes", "on", "0o17", "1e309", "-.nan", "2001-12-14t21:59:43.10-05:00", "<<: *a",
          "\t", "\ufeff", "\x85", "\u2028", "é", "🚀", "\\", "%", "@", "`", "targets: [xnli]", "seeds: [1]"]
yaml_texts = st.lists(st.sampled_from(TOKENS), max_size=40).map("".join)
# Documents that are valid YAML but any shape: nested maps, lists and scalars.
yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


def run_cli(args: list[str]) -> tuple[int, str]:
    started = time.monotonic()
    result = runner.invoke(app, args)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND_SECONDS, f"{args} took {elapsed:.1f}s"
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:
        assert isinstance(result.exception, SystemExit), (args, result.output, result.exception)
    return result.exit_code, result.output


def assert_refused_clearly(output: str) -> None:
    """Exit 2's message: one line about the file, or every problem on a line naming its field."""
    lines = [line for line in output.splitlines() if line.strip()]
    problems = [line[4:] for line in lines if line.startswith("  - ")]
    if problems:
        assert all(PROBLEM.match(p) for p in problems), output
    else:
        assert len(lines) == 1 and lines[0].lower().startswith("error: cannot read"), output


def expected_code(text: bytes) -> int:
    """What the CLI must answer for this file: 0 if it reads as a valid spec, else 2."""
    try:
        load_spec_text(text.decode("utf-8"))
    except (SpecError, UnicodeDecodeError):
        return 2
    return 0


def check_file(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    expected = expected_code(content)
    for args in (["validate", str(path)], ["plan", str(path), "--output", "json"]):
        code, output = run_cli(args)
        assert code == expected, (args, content[:200], output)
        if code == 2:
            assert_refused_clearly(output)


@st.composite
def mutated_valid_specs(draw: st.DrawFn) -> Any:
    """A valid spec with exactly one thing changed."""
    doc = copy.deepcopy(draw(valid_specs))
    path = draw(st.sampled_from(list(nodes(doc))))
    if not mutate(draw, doc, path):
        replace(doc, path, draw(wrong_type))
    return doc


FAST = settings(max_examples=10, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MANY = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FAST
@given(content=st.binary(max_size=2000))
def test_random_bytes(tmp_path: Path, content: bytes) -> None:
    check_file(tmp_path / "spec.yaml", content)


@FAST
@given(text=yaml_texts)
def test_random_yaml_syntax(tmp_path: Path, text: str) -> None:
    check_file(tmp_path / "spec.yaml", text.encode("utf-8", errors="surrogatepass"))


@FAST
@given(value=yaml_values)
def test_random_yaml_documents(tmp_path: Path, value: Any) -> None:
    check_file(tmp_path / "spec.yaml", yaml.safe_dump(value, allow_unicode=True).encode())


@FAST
@given(document=mutated_valid_specs())
def test_valid_specs_with_one_mutation(tmp_path: Path, document: Any) -> None:
    check_file(tmp_path / "spec.yaml", yaml.safe_dump(document, allow_unicode=True).encode())


@pytest.mark.slow
@MANY
@given(content=st.one_of(st.binary(max_size=20_000), yaml_texts.map(str.encode),
                         yaml_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True).encode()),
                         mutated_valid_specs().map(lambda d: yaml.safe_dump(d, allow_unicode=True).encode())))
def test_many_random_files(tmp_path: Path, content: bytes) -> None:
    check_file(tmp_path / "spec.yaml", content)


@pytest.mark.slow
def test_the_installed_cli_on_random_files(tmp_path: Path) -> None:
    """The real entry point, in its own process: each file gets exit 2 and a clear message, no
    traceback; the time bound allows for the interpreter's start, measured alongside."""
    files = {"bytes": bytes(range(256)) * 4, "yaml": b"&a [*a]\n", "tag": b"!!python/object/apply:os.system ['id']\n",
             "list as key": b"? [a]\n: 1\n",
             "mutated": b"name: x\nmodels: [{name: m, pretrained: a/b, resources: {gpus: -1}}]\ntargets: [xnli]\n"}
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "xstilts.operator.cli", "--help"], capture_output=True, timeout=120)
    startup = time.monotonic() - started
    for name, content in files.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content)
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "xstilts.operator.cli", "validate", str(path)],
                             capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert out.returncode == 2, (name, out.stdout, out.stderr)
        assert "Traceback" not in out.stdout + out.stderr, out.stderr
        assert_refused_clearly(out.stdout + out.stderr)
        assert elapsed < startup + BOUND_SECONDS, (name, elapsed, startup)
