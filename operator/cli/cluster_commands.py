"""The cluster commands: `submit`, `status`, `logs`, `delete` and `controller`.

Credentials are found like kubectl finds them (--kubeconfig, $KUBECONFIG, ~/.kube/config,
in-cluster). Every failure — no cluster, no CRD, not found, forbidden — is one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from xstilts.operator.cli.common import console, fail, load_spec, warn
from xstilts.trainer.config import ExitCode

if TYPE_CHECKING:
    from xstilts.operator.cluster.runtime.kube_api import Kube
    from xstilts.operator.experiment.spec import ExperimentSpec

Kubeconfig = Annotated[str | None, typer.Option(
    "--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).")]
Context = Annotated[str | None, typer.Option("--context", help="Kubeconfig context (default: the current one).")]
def _checked_namespace(value: str | None) -> str | None:
    """--namespace bypasses the spec's own check, so it gets the same one here (exit 2 on a bad name)."""
    from xstilts.operator.experiment.spec import dns_label
    if value is None:
        return None
    try:
        return dns_label(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


Namespace = Annotated[str | None, typer.Option(
    "--namespace", "-n", callback=_checked_namespace, help="Namespace (default: the kubeconfig context's).")]
ExperimentName = Annotated[str, typer.Argument(help="The experiment's name (metadata.name = spec.name).")]


@contextmanager
def cluster_errors() -> Iterator[None]:
    """Turn API and credential errors into one line and exit 1."""
    from xstilts.operator.cluster.runtime.kube_api import ConfigError, KubeError

    try:
        yield
    except KubeError as e:
        fail(str(e))
    except ConfigError as e:
        fail(str(e))


def _connect(kubeconfig: str | None, context: str | None) -> Kube:
    from xstilts.operator.cluster.runtime.kube_api import Kube, connect

    return Kube(connect(kubeconfig, context))


def _require_crd(kube: Kube) -> None:
    from xstilts.operator.cluster.runtime.kube_api import EXPERIMENTS

    if not kube.api_available(EXPERIMENTS.group, EXPERIMENTS.version):
        fail(f"the cluster at {kube.connection.server} has no Experiment CRD ({EXPERIMENTS.api_version});"
                   " install it with `kubectl apply -f k8s/base/crd.yaml` (or `xstilts crd | kubectl apply -f -`),"
                   " or submit with --no-controller")


def _require_secrets(kube: Kube, spec: ExperimentSpec, namespace: str) -> None:
    """Every Secret the spec names must exist, or each run's pod would wait in
    CreateContainerConfigError; a missing one fails with the command that creates it. Only
    metadata is asked for: values never leave the API server."""
    from xstilts.operator.cluster.render import secret_commands
    from xstilts.operator.cluster.runtime.kube_api import METADATA_ONLY_OBJECT, SECRETS, KubeError
    missing = []
    for name, command in secret_commands(spec, namespace).items():
        try:
            kube.request("GET", SECRETS, namespace, name, accept=METADATA_ONLY_OBJECT)
        except KubeError as e:
            if e.not_found:
                missing.append((name, command))
            elif e.status == 403:  # may submit, may not read Secrets: the pods will tell
                warn(f"cannot check that Secret {name} exists in namespace {namespace} ({e.message})")
            else:
                raise
    if missing:
        fail(f"the spec names Secrets that do not exist in namespace {namespace}: "
             + ", ".join(name for name, _ in missing) + "; create them with\n"
             + "\n".join(f"  {command}" for _, command in missing))


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a ConfigMap's run.json) as literal blocks, like kubectl prints them."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def _with_namespace(spec: ExperimentSpec, namespace: str | None) -> ExperimentSpec:
    if not namespace or namespace == spec.cluster.namespace:
        return spec
    return spec.model_copy(update={"cluster": spec.cluster.model_copy(update={"namespace": namespace})})


# --- submit ------------------------------------------------------------------------------


def submit(
    spec_path: Annotated[Path, typer.Argument(help="Experiment spec: a bare spec or a kind: Experiment object.")],
    namespace: Annotated[str | None, typer.Option(
        "--namespace", "-n", callback=_checked_namespace,
        help="Namespace (default: the spec's cluster.namespace).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the objects as YAML instead of creating them; needs no cluster.")] = False,
    no_controller: Annotated[bool, typer.Option(
        "--no-controller", help="Create the runs' Jobs from here (one pass: what can start now; run again to"
        " continue) instead of the Experiment object for the controller.")] = False,
    results_dir: Annotated[Path | None, typer.Option(
        "--results-dir", help="With --no-controller: where this machine sees the runs volume (its mountPath),"
        " to find finished runs' result.json and start the runs that depend on them.")] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Create or update the Experiment (the controller runs it), or with --no-controller its Jobs."""
    from xstilts.operator.cluster.render import for_cluster
    from xstilts.operator.experiment.spec import to_object

    spec = _with_namespace(load_spec(spec_path), namespace)
    ns = spec.cluster.namespace
    try:
        # The controller applies the same defaults; the Experiment keeps the spec as written.
        cluster_spec = for_cluster(spec)
    except ValueError as e:
        fail(f"{spec_path}: {e}", ExitCode.INVALID_INPUT)
    if not no_controller:
        obj = to_object(spec, ns)
        if dry_run:
            sys.stdout.write(_dump_yaml([obj]))
            return
        with cluster_errors():
            kube = _connect(kubeconfig, context)
            _require_crd(kube)
            _require_secrets(kube, spec, ns)
            outcome = _apply_experiment(kube, obj)
        runs = spec.run_count
        console.print(f"experiment.xstilts.dev/{spec.name} {outcome} in namespace {ns}: {runs} runs;"
                     f" follow it with `xstilts status {spec.name} -n {ns}`", soft_wrap=True, highlight=False)
        return
    if dry_run:
        sys.stdout.write(_first_pass_yaml(cluster_spec))
        return
    with cluster_errors():
        kube = _connect(kubeconfig, context)
        _require_secrets(kube, spec, ns)
        lines = _submit_pass(kube, cluster_spec, results_dir)
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def _apply_experiment(kube: Kube, obj: dict[str, Any]) -> str:
    """Create the Experiment, or replace its spec; 'created', 'configured' or 'unchanged'."""
    from xstilts.operator.cluster.runtime.kube_api import EXPERIMENTS, KubeError

    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    for _ in range(5):
        try:
            current = kube.get(EXPERIMENTS, ns, name)
        except KubeError as e:
            if not e.not_found:
                raise
            try:
                kube.create(obj)
                return "created"
            except KubeError as e2:
                if e2.already_exists:
                    continue
                raise
        if current.get("spec") == obj["spec"]:
            return "unchanged"
        current["spec"] = obj["spec"]
        try:
            kube.replace(current)
            return "configured"
        except KubeError as e:
            if not e.conflict:
                raise
    fail(f"experiment {ns}/{name} kept changing while being updated; try again")


def _first_pass_yaml(spec: ExperimentSpec) -> str:
    """What a --no-controller pass would create on an empty cluster: the runs that can
    start at once, at most maxParallel (printing every run's Job would invite applying
    them all, dependants before their checkpoints)."""
    from xstilts.operator.cluster.reconcile import Observed, reconcile
    from xstilts.operator.cluster.render import pod_storage_root
    from xstilts.operator.experiment.plan import plan

    planned = plan(spec, storage_root=pod_storage_root(spec))
    decision = reconcile(spec, planned, Observed(), datetime.now(UTC))
    objects = [o for action in decision.creates for o in action.objects]
    header = (f"# {spec.name}: the first pass creates {len(decision.creates)} of {len(planned.runs)} runs"
              f" (maxParallel {spec.cluster.max_parallel}; dependants wait for their phase-2 results)\n")
    return header + _dump_yaml(objects)


def _submit_pass(kube: Kube, spec: ExperimentSpec, results_dir: Path | None) -> list[str]:
    """One reconcile pass from the client: observe the experiment's Jobs (and results when
    the runs volume is visible here), create what may start now, delete orphans."""
    from xstilts.operator.cluster.controller import create_run, delete_run
    from xstilts.operator.cluster.reconcile import Observed, ObservedJob, reconcile
    from xstilts.operator.cluster.render import experiment_selector, pod_storage_root
    from xstilts.operator.cluster.results import ResultStore
    from xstilts.operator.cluster.runtime.kube_api import JOBS
    from xstilts.operator.experiment.plan import plan

    ns = spec.cluster.namespace
    planned = plan(spec, storage_root=pod_storage_root(spec))
    items = kube.list(JOBS, ns, selector=experiment_selector(spec.name)).get("items") or []
    jobs = [ObservedJob.from_k8s(j) for j in items]
    results, problems = ResultStore(results_dir).read(spec, planned) if results_dir else ({}, [])
    decision = reconcile(spec, planned, Observed(jobs, results), datetime.now(UTC))
    lines = [f"warning: {p}" for p in problems]
    for delete in decision.deletes:
        delete_run(kube, ns, delete.name)
        lines.append(f"job.batch/{delete.name} deleted: {delete.reason}")
    created = 0
    for action in decision.creates:
        job, _ = create_run(kube, action, None)
        if job is None:
            lines.append(f"job.batch/{action.job_name} exists and belongs to an Experiment: left alone")
        else:
            created += 1
            lines.append(f"job.batch/{action.job_name} created")
    counts = decision.status["counts"]
    lines.append(f"{spec.name} in namespace {ns}: {created} Jobs created; {decision.status['message']}")
    waiting = sum(1 for s in decision.status["runs"].values() if s in ("waiting", "queued", "finishing"))
    if waiting:
        hint = "" if results_dir else " (with --results-dir, so that finished phase-2 runs are seen)"
        lines.append(f"{waiting} runs wait for capacity or phase-2 results: run this again later to continue{hint}")
    elif counts["succeeded"] == counts["total"]:
        lines.append("every run has succeeded")
    return lines


# --- status ------------------------------------------------------------------------------


def status(
    name: ExperimentName,
    namespace: Namespace = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
    spec_path: Annotated[Path | None, typer.Option(
        "--spec", help="For an experiment submitted with --no-controller: its spec, to show every planned run.")]
    = None,
    results_dir: Annotated[Path | None, typer.Option(
        "--results-dir", help="With --spec: where this machine sees the runs volume (finished runs' results).")]
    = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """The experiment's phase, progress and GPU-hours, and a table of its runs."""
    from xstilts.operator.cluster.status import gather, print_status

    if output not in ("table", "json"):
        fail(f"--output must be 'table' or 'json', not {output!r}", ExitCode.INVALID_INPUT)
    spec = load_spec(spec_path) if spec_path is not None else None
    if spec is not None and spec.name != name:
        fail(f"{spec_path} is the spec of experiment {spec.name}, not {name}", ExitCode.INVALID_INPUT)
    with cluster_errors():
        kube = _connect(kubeconfig, context)
        ns = namespace or (spec.cluster.namespace if spec is not None else kube.namespace)
        view = gather(kube, ns, name, spec, results_dir)
    if view is None:
        fail(f"experiment {name} not found in namespace {ns} (no Experiment object and no Jobs labelled"
                   f" xstilts.dev/experiment={name})")
    if output == "json":
        sys.stdout.write(json.dumps(view.to_json(), indent=2) + "\n")
        return
    print_status(view, console)


# --- logs --------------------------------------------------------------------------------


def logs(
    name: ExperimentName,
    run_id: Annotated[str, typer.Argument(help="The run id (a unique prefix is enough), as `xstilts status` shows.")],
    namespace: Namespace = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming new lines.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", help="Only the last N lines.")] = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """The trainer's log of one run (its Job's newest pod; rank 0 of a multi-node run)."""
    from xstilts.operator.cluster.render import (
        COMPLETION_INDEX_ANNOTATION,
        CONTAINER_NAME,
        RUN_ID_LABEL,
        experiment_selector,
    )
    from xstilts.operator.cluster.runtime.kube_api import JOBS, PODS, KubeError

    with cluster_errors():
        kube = _connect(kubeconfig, context)
        ns = namespace or kube.namespace
        jobs = kube.list(JOBS, ns, selector=experiment_selector(name)).get("items") or []
        matches = sorted({(j["metadata"]["labels"].get(RUN_ID_LABEL, ""), j["metadata"]["name"]) for j in jobs
                          if j["metadata"]["labels"].get(RUN_ID_LABEL, "").startswith(run_id)})
        if not matches:
            fail(f"no Job for run {run_id} of experiment {name} in namespace {ns}: it has not been"
                       " created yet, or it finished and was removed after ttlSecondsAfterFinished")
        if len(matches) > 1:
            fail(f"run id {run_id!r} is ambiguous: {', '.join(rid for rid, _ in matches)}")
        job_name = matches[0][1]
        pods = kube.list(PODS, ns, selector=f"batch.kubernetes.io/job-name={job_name}").get("items") or []
        if not pods:
            fail(f"Job {job_name} has no pod (yet): see `kubectl describe job {job_name} -n {ns}`")

        def rank_then_age(pod: dict[str, Any]) -> tuple[int, str]:
            index = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "0")
            return (-int(index) if index.isdigit() else 0, pod["metadata"].get("creationTimestamp", ""))

        pod = max(pods, key=rank_then_age)["metadata"]["name"]
        query: dict[str, Any] = {"container": CONTAINER_NAME, "follow": "true" if follow else None,
                                 "tailLines": tail}
        try:
            for chunk in kube.stream(PODS, ns, pod, "log", query):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        except KubeError as e:
            if e.status not in (400, 404):
                raise
            # 400: the container has not started; 404: the node no longer has (or never
            # served) the log, e.g. a pod that ran on a node since removed.
            fail(f"no log for pod {pod} of Job {job_name}: {e.message}")


# --- delete ------------------------------------------------------------------------------


def delete(
    name: ExperimentName,
    namespace: Namespace = None,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
) -> None:
    """Delete the Experiment; its Jobs, pods and ConfigMaps go with it (garbage collection).
    For an experiment submitted with --no-controller, delete its Jobs directly."""
    from xstilts.operator.cluster.controller import delete_run
    from xstilts.operator.cluster.render import experiment_selector
    from xstilts.operator.cluster.runtime.kube_api import EXPERIMENTS, JOBS

    with cluster_errors():
        kube = _connect(kubeconfig, context)
        ns = namespace or kube.namespace
        jobs = kube.list(JOBS, ns, selector=experiment_selector(name)).get("items") or []
        has_crd = kube.api_available(EXPERIMENTS.group, EXPERIMENTS.version)
        if has_crd and kube.delete(EXPERIMENTS, ns, name):
            console.print(f"experiment.xstilts.dev/{name} deleted from namespace {ns}; its {len(jobs)} Jobs are"
                         " removed by garbage collection", soft_wrap=True, highlight=False)
            return
        if not jobs:
            fail(f"experiment {name} not found in namespace {ns}")
        for job in jobs:
            delete_run(kube, ns, job["metadata"]["name"])
    console.print(f"deleted the {len(jobs)} Jobs of experiment {name} in namespace {ns}", highlight=False)


# --- controller --------------------------------------------------------------------------


def controller(
    namespace: Annotated[str | None, typer.Option(
        "--namespace", "-n", envvar="XSTILTS_NAMESPACE",
        help="Watch this namespace (default: the kubeconfig context's, or the pod's own).")] = None,
    all_namespaces: Annotated[bool, typer.Option(
        "--all-namespaces", "-A", help="Watch every namespace (needs a ClusterRole with the Role's rules).")] = False,
    kubeconfig: Kubeconfig = None,
    context: Context = None,
    results_dir: Annotated[Path | None, typer.Option(
        "--results-dir", envvar="XSTILTS_RESULTS_DIR",
        help="Where this controller sees the runs volume, standing for the runs' mountPath (default: the runs'"
        " own paths, i.e. the volume mounted at the same path).")] = None,
    resync_seconds: Annotated[float, typer.Option(
        "--resync-seconds", min=1.0, help="Reconcile every Experiment at least this often.")] = 30.0,
    health_port: Annotated[int, typer.Option(
        "--health-port", envvar="XSTILTS_HTTP_PORT", min=0, max=65535,
        help="Serve /healthz, /readyz (and /metrics, unless --metrics-port differs); 0 turns it off.")] = 8080,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=1, max=65535, help="Serve /metrics on this port instead.")] = None,
    leader_elect: Annotated[bool, typer.Option(
        "--leader-elect/--no-leader-elect", envvar="XSTILTS_LEADER_ELECT",
        help="Act only while holding the Lease xstilts-controller (one active replica).")] = True,
    lease_namespace: Annotated[str | None, typer.Option(
        "--lease-namespace", help="Namespace of the Lease (default: the watched one).")] = None,
    identity: Annotated[str | None, typer.Option(
        "--identity", envvar="XSTILTS_POD_NAME", help="This replica's name in the Lease.")] = None,
    lease_duration: Annotated[float, typer.Option("--lease-duration", min=1.0, hidden=True)] = 15.0,
    renew_deadline: Annotated[float, typer.Option("--renew-deadline", min=0.5, hidden=True)] = 10.0,
    retry_period: Annotated[float, typer.Option("--retry-period", min=0.1, hidden=True)] = 2.0,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=0.1,
        help="Give up on an API request unanswered for this many seconds (and try again).")] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    tracking_uri: Annotated[str | None, typer.Option(
        "--tracking-uri", envvar="XSTILTS_TRACKING_URI",
        help="The MLflow server that runs of a spec naming none log to (default: the in-cluster server of"
        " k8s/base, http://xstilts-mlflow.xstilts.svc:5000).")] = None,
) -> None:
    """Run the Experiment controller: turn Experiments into Jobs until SIGTERM."""
    from xstilts.operator.cluster.controller import ControllerError, RunOptions, configure_logging, run_controller
    from xstilts.operator.cluster.render import IN_CLUSTER_TRACKING_URI

    if namespace and all_namespaces:
        fail("give either --namespace or --all-namespaces", ExitCode.INVALID_INPUT)
    configure_logging(log_level)
    options = RunOptions(
        namespace=namespace, all_namespaces=all_namespaces, kubeconfig=kubeconfig, context=context,
        results_dir=results_dir, resync_seconds=resync_seconds, health_port=health_port or None,
        metrics_port=metrics_port, leader_elect=leader_elect, lease_namespace=lease_namespace, identity=identity,
        lease_duration=lease_duration, renew_deadline=renew_deadline, retry_period=retry_period,
        request_timeout=request_timeout, tracking_uri=tracking_uri or IN_CLUSTER_TRACKING_URI)
    try:
        code = run_controller(options)
    except ControllerError as e:
        fail(str(e))
    except ValueError as e:  # lease timings that contradict each other
        fail(str(e), ExitCode.INVALID_INPUT)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(delete)
    app.command()(controller)
