"""The controller's view of the runs' result.json files, read from where it mounts the runs
volume. Parsing is `rundir.read_result`'s; this module maps a pod's storage path to the
controller's mount and caches what it found."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xstilts.operator.cluster.reconcile import ResultSummary
from xstilts.operator.cluster.render import pod_storage_root
from xstilts.operator.experiment.plan import Plan
from xstilts.operator.experiment.spec import ExperimentSpec
from xstilts.trainer.rundir import ResultMissing, ResultProblem, RunDir, read_result


@dataclass
class ResultStore:
    """Reads runs' result.json. Pods write them under the experiment's in-pod storage root
    (`render.pod_storage_root`: `<mountPath>/<experiment>`); the controller mounts the same
    volume, at the same path by default, or at `results_dir`, which then stands for the
    mount path.

    A result file is written once, atomically, and never changes: parsed results are
    cached, and only files not seen yet are looked for at each reconcile."""

    results_dir: Path | None = None
    _found: dict[str, ResultSummary] = field(default_factory=dict)

    def path(self, spec: ExperimentSpec, run_id: str) -> Path:
        """Where the controller finds a run's result.json."""
        root = pod_storage_root(spec)
        if self.results_dir is not None:
            relative = root[len(spec.cluster.storage.mount_path.rstrip("/")):].lstrip("/")
            root = str(self.results_dir / relative)
        return RunDir.at(root, run_id).result

    def read(self, spec: ExperimentSpec, plan: Plan) -> tuple[dict[str, ResultSummary], list[str]]:
        """The results of the plan's runs that have one (its reserve and held runs too: reconcile adds
        seeds from there once it sees their first results), and a line per unreadable file."""
        found: dict[str, ResultSummary] = {}
        problems: list[str] = []
        for run in (*plan.runs, *plan.later):
            path = self.path(spec, run.run_id)
            key = str(path)
            summary = self._found.get(key)
            if summary is None:
                try:
                    result = read_result(path, run.run_id)
                except ResultMissing:
                    continue
                except ResultProblem as e:
                    problems.append(str(e))
                    continue
                summary = ResultSummary.from_result(result)
                self._found[key] = summary
            elif not path.exists():  # deleted, e.g. to train the run again
                del self._found[key]
                continue
            found[run.run_id] = summary
        return found, problems
