"""render: one planned run → the Kubernetes objects that execute it (pure).

For each run, in the order they should be created:

1. a ConfigMap holding ``run.json`` (the run's RunConfig, with ``storage_root`` pointing into
   the pod's storage), mounted read-only at ``/etc/xstilts/run.json``;
2. for multi-node runs only, a headless Service named like the Job, so that pod ``i`` of the
   Indexed Job is reachable as ``<job>-<i>.<job>`` and torchrun's static rendezvous finds
   rank 0 at ``<job>-0.<job>``;
3. the ``batch/v1`` Job.

All three share the Job's name (derived from the run id by `job_name`), the run's labels and,
when an owner is given, an ownerReference to the Experiment, so deleting the Experiment
garbage-collects everything.

The container never runs a shell: its command is an exec array of fixed words plus values
that the spec validates (GPU counts, the Job's own name). Credentials appear only as Secret
references. Nothing here reads a clock or the API: the same inputs give the same objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from xstilts.operator.experiment.plan import Plan, PlannedRun, gc_paused
from xstilts.operator.experiment.spec import ExperimentSpec, ModelResources, clean_label_value
from xstilts.trainer.config import ExitCode, RunConfig
from xstilts.trainer.launch import trainer_command
from xstilts.trainer.rundir import RunDir, run_dir

# --- names and labels --------------------------------------------------------------------

EXPERIMENT_LABEL = "xstilts.dev/experiment"
RUN_ID_LABEL = "xstilts.dev/run-id"
STAGE_LABEL = "xstilts.dev/stage"
MODEL_LABEL = "xstilts.dev/model"
INTERMEDIATE_LABEL = "xstilts.dev/intermediate"
TARGET_LABEL = "xstilts.dev/target"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "xstilts"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# An intermediate run has no target; the label still exists so that `-L xstilts.dev/target`
# and selectors such as `xstilts.dev/target=none` work uniformly.
NO_TARGET = "none"

# Indexed Job pods get the hostname `<job>-<index>`, which must itself be a DNS label
# (≤ 63): with at most 512 nodes the index takes up to 3 digits and a dash.
MAX_JOB_NAME = 59

_NOT_DNS = re.compile(r"[^a-z0-9-]+")

# --- in-pod layout -----------------------------------------------------------------------

CONTAINER_NAME = "trainer"
RUN_CONFIG_KEY = RunDir.RUN_CONFIG
RUN_CONFIG_DIR = "/etc/xstilts"
RUN_CONFIG_PATH = f"{RUN_CONFIG_DIR}/{RUN_CONFIG_KEY}"
# Used when the spec names no storage: the runs PVC that k8s/ overlays create.
DEFAULT_RUNS_PVC = "xstilts-runs"
RENDEZVOUS_PORT = 29500
RUN_AS_USER = 1000
# Long enough for a ZeRO-3 checkpoint of a 10B model (optimizer state included) to reach
# shared storage after SIGTERM; the trainer then exits with ExitCode.INTERRUPTED.
TERMINATION_GRACE_SECONDS = 300
WORKER_SHUTDOWN_SECONDS = TERMINATION_GRACE_SECONDS - 20
GPU_RESOURCE = "nvidia.com/gpu"
# /dev/shm is memory-backed and counts against the container's memory limit. DataLoader
# workers pass batches through it and NCCL keeps its buffers there: a quarter of the pod's
# memory, at most 16 GiB per process, is plenty for both and leaves the rest for the model.
SHM_SHARE = 4
SHM_MAX_PER_PROCESS = 16 * 2**30
# The Job controller sets this annotation on each pod of an Indexed Job.
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

# Secret conventions (documented in k8s/README.md): the HF token Secret has a key `token`;
# the MLflow and S3 Secrets hold environment variables as keys (MLFLOW_TRACKING_USERNAME,
# MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# optionally AWS_ENDPOINT_URL) and are loaded whole with envFrom.
HF_TOKEN_KEY = "token"


def secret_commands(spec: ExperimentSpec, namespace: str) -> dict[str, str]:
    """Secret name → the `kubectl create secret` command that makes it with the keys the runs
    read (placeholders for the values), for every Secret the spec names."""
    secrets = spec.cluster.secrets
    keys: dict[str, list[str]] = {}
    if secrets.hf_token:
        keys.setdefault(secrets.hf_token, []).append(f"{HF_TOKEN_KEY}=<Hugging Face token>")
    if secrets.mlflow:
        keys.setdefault(secrets.mlflow, []).extend(
            ["MLFLOW_TRACKING_USERNAME=<user>", "MLFLOW_TRACKING_PASSWORD=<password>"])
    if secrets.s3:
        keys.setdefault(secrets.s3, []).extend(
            ["AWS_ACCESS_KEY_ID=<key id>", "AWS_SECRET_ACCESS_KEY=<secret key>"])
    return {name: f"kubectl -n {namespace} create secret generic {name} "
                  + " ".join(f"--from-literal='{literal}'" for literal in literals)
            for name, literals in keys.items()}


class OwnerRef(BaseModel):
    """The Experiment that owns a run's objects; deleting it cascades to them.

    `namespace` is the owner's own namespace (not part of the ownerReference): an owner and
    what it owns must share a namespace, or the garbage collector deletes the owned objects
    as orphans. When it is set, render places the run's objects there, whatever
    spec.cluster.namespace says."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    api_version: str = Field(alias="apiVersion")
    kind: str
    name: str
    uid: str
    namespace: str | None = None

    @classmethod
    def of(cls, obj: dict[str, Any]) -> OwnerRef:
        """The reference to an object as the API returned it (needs metadata.uid)."""
        meta = obj.get("metadata") or {}
        return cls(api_version=obj["apiVersion"], kind=obj["kind"], name=meta["name"], uid=meta["uid"],
                   namespace=meta.get("namespace"))

    def to_k8s(self) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def job_name(experiment: str, run_id: str) -> str:
    """`<experiment>-<run id>`: stable, unique per run, a DNS-1035 label of at most 59
    characters (so it also names a Service and leaves room for Indexed Job hostnames).

    The run id (a hex hash) is always kept whole; a long or odd experiment name is
    lower-cased, stripped of invalid characters and shortened instead. A name that would not
    start with a letter (Services need one) gets an `x-` prefix."""
    rid = _NOT_DNS.sub("-", run_id.lower()).strip("-")
    if not rid:
        raise ValueError(f"run id {run_id!r} has no letters or digits; a Job name cannot be derived from it")
    prefix = _NOT_DNS.sub("-", experiment.lower()).strip("-")
    if not prefix[:1].isalpha():
        prefix = f"x-{prefix}".rstrip("-")
    room = MAX_JOB_NAME - len(rid) - 1
    if room < 1:
        return f"x-{rid[: MAX_JOB_NAME - 2]}".rstrip("-")
    prefix = prefix[:room].rstrip("-")
    return f"{prefix}-{rid}"


def run_labels(run: PlannedRun) -> dict[str, str]:
    """The labels every object of a run carries; `reconcile.ObservedJob.from_k8s` reads
    EXPERIMENT_LABEL and RUN_ID_LABEL back."""
    labels = run.labels
    return {
        EXPERIMENT_LABEL: clean_label_value(labels.experiment),
        RUN_ID_LABEL: clean_label_value(run.run_id),
        STAGE_LABEL: run.config.stage.value,
        MODEL_LABEL: clean_label_value(labels.model),
        INTERMEDIATE_LABEL: clean_label_value(labels.intermediate),
        TARGET_LABEL: clean_label_value(labels.target) if labels.target else NO_TARGET,
        MANAGED_BY_LABEL: MANAGED_BY,
    }


def experiment_selector(experiment: str) -> str:
    """The label selector that lists every object xstilts made for an experiment."""
    return f"{EXPERIMENT_LABEL}={clean_label_value(experiment)},{MANAGED_BY_LABEL}={MANAGED_BY}"


# --- storage -----------------------------------------------------------------------------


def pod_storage_root(spec: ExperimentSpec) -> str:
    """The experiment's storage root as a pod sees it: `<mountPath>/<experiment>` on the
    runs PVC. Run directories are `<root>/runs/<run id>/` (rundir.RunDir)."""
    return f"{spec.cluster.storage.mount_path.rstrip('/')}/{spec.name}"


def result_file(spec: ExperimentSpec, run_id: str) -> str:
    """Where a run's result.json lands, as a pod (or the controller, which mounts the runs
    volume at the same path) sees it."""
    return f"{run_dir(pod_storage_root(spec), run_id)}/{RunDir.RESULT}"


def runs_pvc(spec: ExperimentSpec) -> str:
    """The PVC mounted into run pods: the spec's, or DEFAULT_RUNS_PVC when the spec names none."""
    return spec.cluster.storage.pvc or DEFAULT_RUNS_PVC


# --- MLflow ------------------------------------------------------------------------------

# The MLflow server of k8s/base (its Service in the namespace `xstilts`), as pods reach it.
IN_CLUSTER_TRACKING_URI = "http://xstilts-mlflow.xstilts.svc:5000"
# Stores that live on the filesystem of whoever opens them: in a pod, on the runs volume.
LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")


def for_cluster(spec: ExperimentSpec, tracking_uri: str = IN_CLUSTER_TRACKING_URI) -> ExperimentSpec:
    """The spec as its runs execute on a cluster: a spec that names no MLflow server logs to
    `tracking_uri` (the in-cluster server by default). Raises ValueError, naming the field and
    the fix, for a tracking store that would live on the pods' own filesystem: a SQLite file on
    the shared runs volume breaks under many concurrent writers, and no server would show it."""
    uri = spec.mlflow.tracking_uri
    if uri is None:
        mlflow = spec.mlflow.model_copy(update={"tracking_uri": tracking_uri})
        return spec.model_copy(update={"mlflow": mlflow})
    if uri.startswith(LOCAL_TRACKING_SCHEMES):
        raise ValueError(
            f"mlflow.trackingUri: {uri.split(':', 1)[0]}: is a store on the pods' own filesystem (on the shared"
            " runs volume, with every run writing to it at once), not usable on a cluster; leave"
            f" mlflow.trackingUri out to log to the in-cluster MLflow server ({tracking_uri}), or name an"
            " http(s):// server")
    return spec


def pod_run_config(run: PlannedRun, spec: ExperimentSpec) -> RunConfig:
    """The RunConfig the pod reads: the planned one with its storage root moved into the
    pod's storage. The run id does not change (storage is not part of a run's identity)."""
    return run.config.model_copy(update={"storage_root": pod_storage_root(spec)})


# --- quantities --------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_FACTORS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    """A memory quantity as the spec allows it ("64Gi", "500M", "1.5Gi") in bytes."""
    match = _QUANTITY.match(quantity)
    if not match:
        raise ValueError(f"memory {quantity!r} is not a quantity such as 64Gi or 500M")
    return int(float(match.group(1)) * _FACTORS[match.group(2)])


def shm_size(memory: str, processes: int) -> str:
    """The /dev/shm size limit: SHM_SHARE of the memory, at most SHM_MAX_PER_PROCESS per
    process, at least 64 MiB."""
    mebibytes = max(min(memory_bytes(memory) // SHM_SHARE, SHM_MAX_PER_PROCESS * processes) // 2**20, 64)
    return f"{mebibytes // 1024}Gi" if mebibytes % 1024 == 0 else f"{mebibytes}Mi"


# --- the objects -------------------------------------------------------------------------


@dataclass
class _Shared:
    """What every run of an experiment has in common, worked out once per experiment:
    rendering 10,000 runs would otherwise rebuild it 10,000 times. Each object still gets
    its own dicts (callers may change what they receive), built from these values."""

    spec: ExperimentSpec
    owner: OwnerRef | None
    namespace: str
    pvc: str
    env_tail: list[dict[str, Any]]  # the spec's variables, after the per-run ones
    env_from: list[dict[str, Any]]
    tolerations: list[dict[str, Any]]
    models: dict[str, ModelResources]
    shm: dict[tuple[str, int], str] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: ExperimentSpec, owner: OwnerRef | None) -> _Shared:
        return cls(spec=spec, owner=owner, namespace=run_namespace(spec, owner), pvc=runs_pvc(spec),
                   env_tail=_spec_env(spec), env_from=_env_from(spec),
                   tolerations=[t.model_dump(by_alias=True, exclude_none=True) for t in spec.cluster.tolerations],
                   models={m.name: m.resources for m in reversed(spec.models)})

    def model(self, run: PlannedRun) -> ModelResources:
        try:
            return self.models[run.labels.model]
        except KeyError:
            raise ValueError(f"run {run.run_id} names model {run.labels.model!r}, which is not in the spec's"
                             " models") from None

    def shm_size(self, run: PlannedRun) -> str:
        key = (run.labels.model, run.config.resources.procs_per_node)
        if key not in self.shm:
            self.shm[key] = shm_size(self.model(run).memory, key[1])
        return self.shm[key]


def render_run(run: PlannedRun, spec: ExperimentSpec, owner: OwnerRef | None = None) -> list[dict[str, Any]]:
    """The objects that execute one run, in creation order: ConfigMap, [headless Service
    for multi-node runs], Job, all in `run_namespace(spec, owner)`."""
    return _render(run, _Shared.of(spec, owner))


def render_experiment(plan: Plan, spec: ExperimentSpec, owner: OwnerRef | None = None) -> list[dict[str, Any]]:
    """Every run's objects in plan order (dependencies first): the whole experiment at once, e.g.
    to check each object against the Kubernetes schemas. The controller renders run by run."""
    shared = _Shared.of(spec, owner)
    # The cyclic collector would walk every object rendered so far, again and again.
    with gc_paused():
        return [obj for run in plan.runs for obj in _render(run, shared)]


def _render(run: PlannedRun, shared: _Shared) -> list[dict[str, Any]]:
    name = job_name(shared.spec.name, run.run_id)
    labels = run_labels(run)
    objects = [_config_map(run, shared, name, labels)]
    if run.config.resources.nodes > 1:
        objects.append(_headless_service(shared, name, labels))
    objects.append(_job(run, shared, name, labels))
    return objects


def run_namespace(spec: ExperimentSpec, owner: OwnerRef | None = None) -> str:
    """The owner's namespace when known (ownerReferences cannot cross namespaces), else
    spec.cluster.namespace."""
    return owner.namespace if owner is not None and owner.namespace else spec.cluster.namespace


def _metadata(shared: _Shared, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": shared.namespace, "labels": dict(labels)}
    if shared.owner is not None:
        meta["ownerReferences"] = [shared.owner.to_k8s()]
    return meta


def _config_map(run: PlannedRun, shared: _Shared, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(shared, name, labels),
        # The config is content-addressed by the run id: it never changes, and immutable
        # ConfigMaps are not watched by kubelets, which matters with thousands of runs.
        "immutable": True,
        "data": {RUN_CONFIG_KEY: pod_run_config(run, shared.spec).to_json()},
    }


def _headless_service(shared: _Shared, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(shared, name, labels),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must resolve before every pod is Ready: the other ranks connect to it
            # while it is still starting.
            "publishNotReadyAddresses": True,
            "selector": {EXPERIMENT_LABEL: labels[EXPERIMENT_LABEL], RUN_ID_LABEL: labels[RUN_ID_LABEL]},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def pod_command(config: RunConfig, name: str) -> list[str]:
    """The container's exec array (launch.trainer_command). Several nodes: a static rendezvous
    on pod 0 of the Indexed Job, each pod's rank being its completion index (expanded by the
    kubelet from the container's environment, not by a shell). Kubernetes restarts failed pods
    (within backoffLimit); on SIGTERM torchrun's workers get the grace period, less a margin
    for torchrun itself to exit."""
    res = config.resources
    rendezvous = ("--node_rank=$(JOB_COMPLETION_INDEX)", f"--master_addr={name}-0.{name}",
                  f"--master_port={RENDEZVOUS_PORT}")
    return trainer_command(RUN_CONFIG_PATH, res.procs_per_node, res.nodes, rendezvous=rendezvous,
                           shutdown_timeout=WORKER_SHUTDOWN_SECONDS)


def literal_env_value(value: str) -> str:
    """The kubelet expands `$(NAME)` in env values from the variables defined before them:
    a tracking URI such as `http://host/$(HF_TOKEN)` would otherwise receive the token.
    `$$` is the escape for a literal `$`."""
    return value.replace("$", "$$")


def _env(run: PlannedRun, shared: _Shared) -> list[dict[str, Any]]:
    config = run.config
    spec = shared.spec
    hf_home = f"{spec.cluster.storage.mount_path.rstrip('/')}/.cache/huggingface"
    env: list[dict[str, Any]] = [
        {"name": "XSTILTS_EXPERIMENT", "value": literal_env_value(spec.name)},
        {"name": "XSTILTS_RUN_ID", "value": run.run_id},
        # The root filesystem is read-only: everything that caches goes to /tmp, except the
        # hub cache, which lives on the shared runs volume so a 40 GB checkpoint is
        # downloaded once per cluster, not once per run.
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
        {"name": "HF_HOME", "value": literal_env_value(hf_home)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if config.resources.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    if config.resources.nodes > 1:
        # The Job controller would inject the same variable into Indexed Job pods (it skips
        # a container that already declares it); declaring it here makes the template say
        # where `--node_rank=$(JOB_COMPLETION_INDEX)` comes from, and the kubelet expands it.
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}})
    env += _copied(shared.env_tail)
    return env


def _spec_env(spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The variables that come from the spec alone, the same for every run."""
    secrets = spec.cluster.secrets
    env: list[dict[str, Any]] = []
    if spec.mlflow.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": literal_env_value(spec.mlflow.tracking_uri)})
    if secrets.hf_token:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": secrets.hf_token, "key": HF_TOKEN_KEY}}})
    return env


def _env_from(spec: ExperimentSpec) -> list[dict[str, Any]]:
    secrets = spec.cluster.secrets
    return [{"secretRef": {"name": name}} for name in (secrets.mlflow, secrets.s3) if name]


def _copied(value: Any) -> Any:
    """A fresh copy of JSON-like data (dicts, lists, scalars): each rendered object owns its
    dicts, so changing one object never changes another run's."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


def _resources(run: PlannedRun, shared: _Shared) -> dict[str, Any]:
    model = shared.model(run)
    # requests == limits for every resource: Guaranteed QoS makes run pods the last to be
    # evicted under node pressure (a multi-day run should not die for a log shipper) and
    # lets the kubelet's CPU manager pin cores for the data loaders.
    amounts: dict[str, Any] = {"cpu": model.cpu, "memory": model.memory}
    if run.config.resources.gpus_per_node:
        amounts[GPU_RESOURCE] = run.config.resources.gpus_per_node
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _volumes(run: PlannedRun, shared: _Shared, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = [
        {"name": "run-config", "configMap": {"name": name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shared.shm_size(run)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": shared.pvc}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "run-config", "mountPath": RUN_CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "runs", "mountPath": shared.spec.cluster.storage.mount_path},
    ]
    return volumes, mounts


def pod_failure_policy() -> dict[str, Any]:
    """How a failed pod counts, first matching rule wins:

    - a pod evicted, preempted (Kueue or the scheduler) or drained carries the
      DisruptionTarget condition → Ignore: not the run's fault, retried without using up
      backoffLimit, and it resumes from its checkpoint;
    - the trainer's ExitCode.INVALID (a config that can never work) → FailJob at once;
    - ExitCode.INTERRUPTED without a disruption condition (SIGTERM from something else)
      → Count. The retry still resumes from the checkpoint, but an unexplained SIGTERM
      loop must stop at backoffLimit rather than retry forever, so it is not ignored;
    - any other exit code → Count (the default).
    """
    return {
        "rules": [
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                                  "values": [int(ExitCode.INVALID)]}},
            {"action": "Count", "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                                                "values": [int(ExitCode.INTERRUPTED)]}},
        ]
    }


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        # The runs volume is written by the trainer: group ownership makes a fresh volume
        # writable; OnRootMismatch avoids re-chowning terabytes of checkpoints at each start.
        "fsGroup": RUN_AS_USER,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _job(run: PlannedRun, shared: _Shared, name: str, labels: dict[str, str]) -> dict[str, Any]:
    cluster = shared.spec.cluster
    res = run.config.resources
    volumes, mounts = _volumes(run, shared, name)
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "command": pod_command(run.config, name),
        "env": _env(run, shared),
        "resources": _resources(run, shared),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if shared.env_from:
        container["envFrom"] = _copied(shared.env_from)
    if res.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # The trainer never talks to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": volumes,
    }
    if cluster.node_selector:
        pod_spec["nodeSelector"] = dict(cluster.node_selector)
    if shared.tolerations:
        pod_spec["tolerations"] = _copied(shared.tolerations)
    if res.nodes > 1:
        pod_spec["subdomain"] = name  # with the Indexed hostname: <job>-<i>.<job>
    job_spec: dict[str, Any] = {
        "completions": res.nodes,
        "parallelism": res.nodes,
        # One failure of a multi-node run fails every rank (the collective breaks), so each
        # attempt costs `nodes` failed pods; scale the limit to keep `backoffLimit` attempts.
        "backoffLimit": cluster.backoff_limit * res.nodes,
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
    }
    if res.nodes > 1:
        job_spec["completionMode"] = "Indexed"
    if cluster.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    if cluster.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = cluster.ttl_seconds_after_finished
    metadata = _metadata(shared, name, labels)
    if cluster.queue:
        metadata["labels"][KUEUE_QUEUE_LABEL] = cluster.queue
        # Kueue admits a Job by unsuspending it; created suspended, it never starts pods
        # before admission even if Kueue's webhook is briefly unavailable.
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}
