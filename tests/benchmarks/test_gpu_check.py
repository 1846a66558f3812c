"""The GPU check rehearsed on the CPU: benchmarks/gpu_check.sh in a venv shaped like the GPU
machine (Python 3.12 with only the packages that machine has, at its versions) plus the wheel
bundle, CUDA absent. It must finish with every step ok: a missing wheel, an import of
something that is not there, or skew between the machine's torch 2.11 / transformers 5.17 and
the versions pinned here fails it.

The venv is cached under ~/.cache/xstilts/gpu-rehearsal/, keyed by the requirement list, and
the bundle beside it, keyed by the bundle script and pyproject.toml. Cold, building both costs
about 3 GB of downloads (torch 2.11 from PyPI brings its CUDA libraries; PyPI has no CPU-only
torch wheel for Linux).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# What the GPU machine has, as recorded (issue 16), at its versions.
DEVICE_REQUIREMENTS = ("torch==2.11.0", "transformers==5.17.0", "accelerate==1.15.0", "tokenizers", "safetensors",
                       "pyarrow", "pyyaml", "rich", "typer")
# What it lacks; pip brings pydantic along with typer, so it is removed again.
DEVICE_LACKS = ("pydantic", "pydantic-core", "datasets", "deepspeed", "mlflow", "flash-attn")
CACHE = Path(os.environ.get("XSTILTS_GPU_REHEARSAL_CACHE", Path.home() / ".cache" / "xstilts" / "gpu-rehearsal"))


def python312() -> str:
    pyenv = Path.home() / ".pyenv" / "versions" / "3.12.1" / "bin" / "python"
    for candidate in (os.environ.get("XSTILTS_PYTHON312"), str(pyenv), shutil.which("python3.12")):
        # (a pyenv shim exists whether or not it resolves: ask it)
        if candidate and subprocess.run([candidate, "-c", "import venv"], capture_output=True,
                                       cwd="/").returncode == 0:
            return candidate
    pytest.fail("no Python 3.12 for the rehearsal venv: set XSTILTS_PYTHON312 to one (pyenv install 3.12)")


def _key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def device_venv() -> Path:
    venv = CACHE / f"venv-{_key(*DEVICE_REQUIREMENTS, *DEVICE_LACKS)}"
    if (venv / "ready").is_file():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    # (from "/": the repository's top-level operator/ would shadow the standard library's)
    subprocess.run([python312(), "-m", "venv", str(venv)], check=True, cwd="/")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", *DEVICE_REQUIREMENTS], check=True, cwd="/")
    subprocess.run([*pip, "uninstall", "--quiet", "--yes", *DEVICE_LACKS], check=True, cwd="/")
    (venv / "ready").write_text("\n".join(DEVICE_REQUIREMENTS) + "\n")
    return venv


def bundle() -> Path:
    script = REPO / "scripts" / "build-gpu-bundle.sh"
    out = CACHE / f"bundle-{_key(script.read_text(), (REPO / 'pyproject.toml').read_text())}"
    if not (out / "ready").is_file():
        env = os.environ | {"PYTHON": sys.executable, "GPU_BUNDLE_DIR": str(out)}
        subprocess.run(["bash", str(script)], check=True, env=env)
        (out / "ready").write_text("")
    return out


def test_the_gpu_check_finishes_in_a_device_shaped_venv_without_cuda(tmp_path: Path) -> None:
    venv, wheels = device_venv(), bundle()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PYTHON": str(venv / "bin" / "python"), "GPU_BUNDLE_DIR": str(wheels),
            "GPU_CHECK_SITE": str(tmp_path / "site"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--out", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    figures = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert {name: step["status"] for name, step in figures["steps"].items()} == {
        "environment": "ok", "model and data": "ok", "trainer ZeRO-2, SIGTERM, resume": "ok",
        "trainer ZeRO-3": "ok", "training benchmark": "ok", "evaluation benchmark": "ok"}
    versions = figures["steps"]["environment"]["figures"]["versions"]
    assert versions["python"].startswith("3.12.")
    assert (versions["torch"].split("+")[0], versions["transformers"], versions["mlflow"]) == ("2.11.0", "5.17.0", None)
    # the skew against the pins is recorded, and the run without MLflow says it was tracking-free
    assert any(d.startswith("torch 2.11.0") for d in figures["degraded"])
    assert any(d.startswith("mlflow absent") for d in figures["degraded"])
    zero2 = figures["steps"]["trainer ZeRO-2, SIGTERM, resume"]["figures"]
    assert zero2["resumed_from"].startswith("checkpoint-") and zero2["train_steps"] == zero2["steps"]
    assert "## GPU check:" in (tmp_path / "out" / "gpu-check.md").read_text()
