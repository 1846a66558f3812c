"""Runs mypy over the package as it is installed, not as it lies in the repo.

pyproject's `package-dir` maps `operator/` to xstilts.operator, `trainer/` to xstilts.trainer
and so on; the editable install serves that through an import hook mypy cannot follow, so
checked by their repo paths the modules would see every `xstilts.*` import as Any. This
builds a tree of links under build/typecheck/ laid out as the real packages, runs mypy on
the mapped `files` of [tool.mypy] with the same settings, and prints its report with the
repo's paths again, so editors and readers land in the real files.

`files` may name folders: every .py file under one is checked, less those whose repo path
matches a regex of [tool.mypy]'s `exclude` (as mypy itself applies `exclude` when it walks a
folder; explicit files would bypass it).

Usage: python scripts/typecheck.py [extra mypy args]; exits with mypy's status.
"""

from __future__ import annotations

import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build") / "typecheck"  # relative to ROOT, so mypy prints short paths


def package_dirs(pyproject: dict[str, Any]) -> dict[str, str]:
    """Package name -> its source dir, from [tool.setuptools] (the install's own mapping)."""
    setuptools = pyproject["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    packages: list[str] = setuptools["packages"]
    return {package: source_dir(package, mapping) for package in packages}


def source_dir(package: str, mapping: dict[str, str]) -> str:
    """A subpackage lies under its nearest mapped parent, as setuptools resolves it."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        parent = ".".join(parts[:n])
        if parent in mapping:
            return "/".join([mapping[parent], *parts[n:]])
    return package.replace(".", "/")


def build_tree(packages: dict[str, str]) -> dict[str, str]:
    """Links every file of each package into TREE/<package path>; returns link path -> repo path.

    Files, not directories, are linked: xstilts/ itself holds the subpackages' links, and
    a linked directory would put them into the source tree. The tree is brought up to date
    in place rather than rebuilt, so that two runs at once never see it half-deleted: each
    link is created or replaced atomically, and links to removed modules are dropped.
    """
    tree = ROOT / TREE
    links: dict[str, str] = {}
    for package, source in packages.items():
        folder = tree / package.replace(".", "/")
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted((ROOT / source).iterdir()):
            if path.is_file() and path.suffix in {".py", ".pyi", ".typed"}:
                link = folder / path.name
                target = os.path.relpath(path, folder)
                if not (link.is_symlink() and os.readlink(link) == target):
                    temporary = folder / f".{path.name}.{os.getpid()}"
                    temporary.unlink(missing_ok=True)
                    temporary.symlink_to(target)
                    os.replace(temporary, link)
                links[str(link.relative_to(ROOT))] = str(path.relative_to(ROOT))
    for link in tree.rglob("*"):
        # A module since removed or renamed; dot-names are another run's links in the making.
        if link.is_symlink() and not link.name.startswith(".") and str(link.relative_to(ROOT)) not in links:
            link.unlink(missing_ok=True)
    return links


def selected_files(entries: list[str], exclude: str | list[str]) -> list[str]:
    """The repo paths to check: each file of `entries` as it is, every .py file under each
    folder, less the paths `exclude` matches (mypy's option: one regex or a list)."""
    patterns = [re.compile(p) for p in ([exclude] if isinstance(exclude, str) else exclude)]
    selected: dict[str, None] = {}
    for entry in entries:
        path = ROOT / entry
        found = sorted(p.relative_to(ROOT).as_posix() for p in path.rglob("*.py")) if path.is_dir() else [entry]
        selected.update(dict.fromkeys(f for f in found if not any(p.search(f) for p in patterns)))
    return list(selected)


def main(argv: list[str]) -> int:
    os.chdir(ROOT)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    links = build_tree(package_dirs(pyproject))
    to_link = {repo: link for link, repo in links.items()}
    settings = pyproject["tool"]["mypy"]
    files = selected_files(settings["files"], settings.get("exclude", []))
    # Explicit files on the command line replace the config's `files`; every other setting
    # (strict, plugins, per-module overrides) still comes from pyproject.toml. A file outside
    # the packages (a script) is checked where it is.
    stdout, stderr, status = api.run([*argv, *(to_link.get(f, f) for f in files)])
    # Longest first, so no link path is rewritten by a shorter one it starts with.
    pattern = re.compile("|".join(re.escape(link) for link in sorted(links, key=len, reverse=True)))
    sys.stdout.write(pattern.sub(lambda m: links[m.group(0)], stdout))
    sys.stderr.write(pattern.sub(lambda m: links[m.group(0)], stderr))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
