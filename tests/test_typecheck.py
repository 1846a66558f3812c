"""scripts/typecheck.py on a small project with the same kind of `package-dir` mapping as
this one: a type error that exists only across modules is found, and reported at the
file's repo path, not at its link in build/typecheck/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent

PYPROJECT = """
[tool.setuptools]
package-dir = { "pkg" = "pkg", "pkg.core" = "core" }
packages = ["pkg", "pkg.core"]

[tool.mypy]
strict = true
files = ["core/use.py", "core/units.py"]
"""


def project(tmp_path: Path, count_returns: str) -> Path:
    for path, text in {
        "pyproject.toml": PYPROJECT,
        "pkg/__init__.py": "",
        "core/__init__.py": "",
        "core/units.py": f"def count() -> {count_returns}:\n    return 2\n",
        # Checked by its repo path, `pkg.core.units` would not resolve and count() would be Any.
        "core/use.py": "from pkg.core.units import count\n\n\ndef double() -> int:\n    return count() * 2\n",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "typecheck.py", tmp_path / "scripts" / "typecheck.py")
    return tmp_path


def typecheck(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(root / "scripts" / "typecheck.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cross_module_error_is_reported_at_the_repo_path(tmp_path: Path) -> None:
    result = typecheck(project(tmp_path, "int | None"))
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("core/use.py:5: error: Unsupported operand"), result.stdout
    assert "build/typecheck" not in result.stdout + result.stderr
    # The links are rebuilt in the project's own build dir, the sources left as they were.
    assert (tmp_path / "build/typecheck/pkg/core/use.py").is_symlink()
    assert sorted(p.name for p in (tmp_path / "core").iterdir()) == ["__init__.py", "units.py", "use.py"]


def test_correct_project_passes_and_a_removed_module_leaves_the_tree(tmp_path: Path) -> None:
    root = project(tmp_path, "int")
    (root / "core/old.py").write_text("")
    result = typecheck(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout
    assert (root / "build/typecheck/pkg/core/old.py").is_symlink()

    (root / "core/old.py").unlink()
    assert typecheck(root).returncode == 0
    assert not (root / "build/typecheck/pkg/core/old.py").is_symlink()


def test_a_folder_in_files_checks_every_module_under_it_less_the_excluded(tmp_path: Path) -> None:
    root = project(tmp_path, "int | None")  # the error is in core/use.py
    listed = 'files = ["core/use.py", "core/units.py"]'
    pyproject = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(pyproject.replace(listed, 'files = ["core"]\nexclude = ["^core/use\\\\.py$"]'))
    result = typecheck(root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 2 source files" in result.stdout  # __init__.py and units.py

    (root / "pyproject.toml").write_text(pyproject.replace(listed, 'files = ["core"]'))
    result = typecheck(root)
    assert result.returncode == 1 and "core/use.py:5: error:" in result.stdout, result.stdout + result.stderr
