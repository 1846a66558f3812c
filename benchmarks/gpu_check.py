"""The GPU check: what a short window on a bare GPU machine must measure, in one command.

    bash benchmarks/gpu_check.sh        (or `make gpu-check`; it runs the two phases below)

1. `install BUNDLE SITE`: the wheels `make gpu-bundle` built (carried to the machine, which
   reaches no registry) go into the private directory SITE, without the network and without
   touching the machine's own packages; a wheel whose project the machine already has at the
   same or a newer version is left out. This source tree is laid out there as the `xstilts`
   package. Standard library only: nothing else may be importable yet.
2. `run --out DIR` (with SITE on PYTHONPATH): each step below is timed, and a step that fails is
   recorded with its error while the others go on.
   - environment: versions, the device and its dense bf16 peak, version skew against the pins
     of pyproject.toml, and whether the HF `Trainer` seams StiltsTrainer needs (hf_seams.py)
     hold. Where they do not, the trainer runs degraded (XSTILTS_ALLOW_MISSING_HF_SEAMS) and
     the JSON says so instead of the check failing.
   - the trainer's CUDA path end to end, as a cluster runs it (`python -m
     xstilts.trainer.launch` = torchrun, one process): an XLM-R-large-shaped encoder with
     random weights, precision "auto" (bf16), SDPA (flash-attention-2 if installed), fused
     AdamW, the automatic micro batch; ZeRO-2 stopped by SIGTERM mid-training (the checkpoint a
     preemption writes) and started again (the resume), then ZeRO-3. MLflow is absent, so the
     runs are tracking-free.
   - benchmarks/train_throughput.py (xstilts against HF default and HF best, interleaved in
     one process; real tokens/s, ratios, MFU against the stated peak) and
     benchmarks/eval_throughput.py.
   It writes DIR/gpu-check.json (every figure) and DIR/gpu-check.md (a section for
   benchmarks/RESULTS.md), and exits 1 if a step failed.

Without CUDA it takes the same steps on the CPU with the tiny architecture and fewer steps (the
rehearsal, tests/benchmarks/test_gpu_check.py): DeepSpeed on its CPU accelerator, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
# The device's packages the training stack needs; what the bundle adds; what must stay absent.
DEVICE_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "pyarrow", "yaml", "rich",
                   "typer")
BUNDLED = ("pydantic", "datasets", "deepspeed", "numpy", "pandas")
OPTIONAL = ("mlflow", "flash_attn")


@dataclass(frozen=True)
class Profile:
    """How much each step does: XLM-R large on a GPU (fits 8 minutes on an H100), the tiny
    architecture on a CPU (the rehearsal)."""

    model: str
    zero_steps: int  # ZeRO-2 run (interrupted, then resumed)
    zero3_steps: int
    interrupt_at: int  # step after which the ZeRO-2 run gets SIGTERM
    bench_steps: int
    bench_repeats: int
    bench_warmup: int
    eval_per_language: int
    eval_repeats: int


GPU = Profile("large", zero_steps=60, zero3_steps=20, interrupt_at=10, bench_steps=60, bench_repeats=3,
              bench_warmup=1, eval_per_language=1000, eval_repeats=2)
CPU = Profile("tiny", zero_steps=40, zero3_steps=10, interrupt_at=10, bench_steps=20, bench_repeats=2,
              bench_warmup=0, eval_per_language=100, eval_repeats=1)
BATCH = 32


# --- phase 1: install -------------------------------------------------------------------------


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def install(bundle: Path, site: Path) -> dict[str, Any]:
    """Wheels of `bundle` into `site` (emptied first), skipping projects the interpreter already
    has at the same or a newer version; then the xstilts package from this tree."""
    from importlib import metadata

    wheels = sorted(bundle.glob("*.whl"))
    if not wheels:
        sys.exit(f"no wheels in {bundle}: run `make gpu-bundle` on a machine with network access and carry"
                 f" {bundle}/ to this one")
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    chosen, kept = [], {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have is not None and _version_key(have) >= _version_key(version):
            kept[_normal(name)] = have
        else:
            chosen.append(wheel)
    if _has_pip():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--disable-pip-version-check", "--target", str(site.resolve()),
                        *(str(w.resolve()) for w in chosen)], check=True, cwd="/")
    else:  # a wheel is a zip of the files of site-packages (the .data scripts are not needed)
        for wheel in chosen:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site, [n for n in z.namelist() if ".data/" not in n.split("/", 1)[0] + "/"])
    package = site / "xstilts"
    package.mkdir()
    shutil.copy(REPO / "xstilts" / "__init__.py", package / "__init__.py")
    for sub, source in (("trainer", "trainer"), ("operator", "operator"), ("demo", "demo")):
        (package / sub).symlink_to(REPO / source, target_is_directory=True)
    report = {"bundle": str(bundle), "site": str(site), "bundle_mib": sum(w.stat().st_size for w in wheels) / 2**20,
              "installed": sorted(_normal(w.name.split("-")[0]) + " " + w.name.split("-")[1] for w in chosen),
              "kept_from_machine": kept}
    (site / "install.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _has_pip() -> bool:
    import importlib.util

    return importlib.util.find_spec("pip") is not None


# --- phase 2: the steps ---------------------------------------------------------------------------


class Check:
    """The JSON being built: steps with status and seconds, figures, what ran degraded."""

    def __init__(self, out: Path, profile: Profile) -> None:
        self.out = out
        self.profile = profile
        self.data: dict[str, Any] = {"started_at": _utc(), "profile": profile.__dict__, "steps": {}, "degraded": []}

    def step(self, name: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        print(f"gpu check: {name} ...", flush=True)
        started = time.monotonic()
        try:
            figures = action()
            status: dict[str, Any] = {"status": "ok"}
        except Exception as e:
            figures = None
            status = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-4000:],
                      "traceback": traceback.format_exc()[-4000:]}
        status["seconds"] = round(time.monotonic() - started, 1)
        self.data["steps"][name] = status | ({"figures": figures} if figures is not None else {})
        print(f"gpu check: {name}: {status['status']} in {status['seconds']} s"
              + (f" ({status['error'].splitlines()[0][:300]})" if "error" in status else ""), flush=True)
        self.save()
        return figures

    def degrade(self, what: str) -> None:
        self.data["degraded"].append(what)

    def save(self) -> None:
        self.data["finished_at"] = _utc()
        (self.out / "gpu-check.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.data["steps"].items() if s["status"] != "ok"]


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pinned_versions() -> dict[str, str]:
    """The training stack's pins (pyproject.toml's `train` extra, `name==version` entries)."""
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", e).groups() for e in extra if "==" in e)  # type: ignore[union-attr,misc]


def environment(check: Check) -> dict[str, Any]:
    import importlib.util
    from importlib import metadata

    import torch

    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for module in (*DEVICE_PACKAGES, *BUNDLED, *OPTIONAL):
        dist = {"yaml": "pyyaml", "flash_attn": "flash-attn"}.get(module, module)
        try:
            versions[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[module] = None
    missing = [m for m in (*DEVICE_PACKAGES, *BUNDLED) if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"not importable: {', '.join(missing)} (the bundle or the machine lacks them)")
    skew = {name: {"pinned": pin, "here": versions.get(name)} for name, pin in pinned_versions().items()
            if name in versions and versions[name] is not None and versions[name].split("+")[0] != pin}
    for name, v in skew.items():
        check.degrade(f"{name} {v['here']} here, pinned {v['pinned']}")
    from xstilts.trainer.hf_seams import CHECKED_AGAINST, check_hf_seams

    seams = check_hf_seams()
    for problem in seams:
        check.degrade(f"HF Trainer seam missing, training runs without it: {problem}")
    if seams:
        os.environ["XSTILTS_ALLOW_MISSING_HF_SEAMS"] = "1"
    if versions["mlflow"] is None:
        check.degrade("mlflow absent: training runs tracking-free (result.json holds the figures)")
    cuda = torch.cuda.is_available()
    device: dict[str, Any] = {"cuda": cuda, "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg())}
    if cuda:
        sys.path.insert(0, str(BENCHMARKS))
        from train_throughput import peak_flops, peak_name

        props = torch.cuda.get_device_properties(0)
        name = torch.cuda.get_device_name()
        device |= {"name": name, "memory_gib": round(props.total_memory / 2**30, 1),
                   "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                   "torch_cuda": torch.version.cuda, "peak_bf16_flops": peak_flops(name), "peak_name": peak_name(name)}
    else:
        device["name"] = "CPU (no CUDA): the rehearsal profile"
    return {"versions": versions, "skew": skew, "hf_seams_checked_against": CHECKED_AGAINST, "hf_seams_missing": seams,
            "device": device}


def prepare(root: Path, profile: Profile) -> dict[str, Any]:
    sys.path.insert(0, str(BENCHMARKS))
    from synthetic import ARCHITECTURES, build_encoder, write_mnli

    arch = ARCHITECTURES[profile.model]
    model = build_encoder(root / "model", arch)
    rows = max(profile.zero_steps, profile.zero3_steps) * BATCH * 2  # the runs stop within their first epoch
    write_mnli(root / "mnli", train=rows, dev=256)
    return {"model": str(model), "architecture": arch.name, "train_rows": rows}


def run_config(root: Path, name: str, steps: int, zero_stage: int) -> Any:
    from xstilts.trainer.config import RunConfig

    return RunConfig.model_validate({
        "model": str(root / "model"), "stage": "intermediate", "tasks": ["mnli"],
        "task_data": {"mnli": str(root / "mnli")}, "storage_root": str(root / name),
        "hyperparameters": {"batch_size": BATCH, "max_steps": steps, "max_seq_length": 128, "learning_rate": 1e-4},
        "deepspeed": {"zero_stage": zero_stage},
    })


def launch(config: Any, log: Path) -> subprocess.Popen[bytes]:
    """The trainer as a cluster pod starts it: the launcher (torchrun in-process), one process."""
    import torch

    run_json = log.with_suffix(".json")
    run_json.write_text(config.to_json())
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if not torch.cuda.is_available():
        env |= {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xstilts.trainer.launch", "--standalone", "--nproc_per_node=1",
               "-m", "xstilts.trainer", str(run_json)]
    # cwd: `-m` puts it on sys.path, and the repository's operator/ would shadow the stdlib's
    return subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=log.parent)


def _wait(process: subprocess.Popen[bytes], log: Path, timeout: float) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"the trainer ran over {timeout:.0f} s; see {log}") from None


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def trainer_run(root: Path, profile: Profile, zero_stage: int, interrupt: bool) -> dict[str, Any]:
    import torch
    from transformers import XLMRobertaModel
    from xstilts.trainer.batch_plan import plan_steps
    from xstilts.trainer.checkpoints import newest_checkpoint
    from xstilts.trainer.config import ExitCode, RunResult
    from xstilts.trainer.model import attention_kernel
    from xstilts.trainer.rundir import RunDir
    from xstilts.trainer.train import micro_batch_inputs

    steps = profile.zero_steps if interrupt else profile.zero3_steps
    config = run_config(root, f"zero{zero_stage}", steps, zero_stage)
    run_dir = RunDir.of(config)
    cuda = torch.cuda.is_available()
    schedule = plan_steps(config, 1, [max(profile.zero_steps, profile.zero3_steps) * BATCH * 2], 128,
                             **micro_batch_inputs(config))
    figures: dict[str, Any] = {
        "zero_stage": zero_stage, "steps": steps, "batch_size": BATCH,
        "micro_batch_size": schedule.micro_batch_size, "accumulation": schedule.accumulation,
        "micro_batch": "automatic (GPU memory)" if cuda else "default (CPU: token cap)",
        "attention": attention_kernel(XLMRobertaModel, cuda, cuda), "optimizer": "adamw_torch_fused"}
    log = root / f"zero{zero_stage}-1.log"
    first = launch(config, log)
    if interrupt:
        progress = run_dir.progress
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and first.poll() is None:
            try:
                if json.loads(progress.read_text()).get("step", 0) >= profile.interrupt_at:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        if first.poll() is not None:
            raise RuntimeError(f"the run ended (exit {first.returncode}) before step {profile.interrupt_at}:\n"
                               + _tail(log))
        first.send_signal(signal.SIGTERM)
        code = _wait(first, log, 600)
        if code != ExitCode.INTERRUPTED:
            raise RuntimeError(f"SIGTERM: exit {code}, expected {int(ExitCode.INTERRUPTED)}:\n" + _tail(log))
        checkpoint = newest_checkpoint(run_dir.resume)
        if checkpoint is None:
            raise RuntimeError("SIGTERM left no checkpoint:\n" + _tail(log))
        figures["interrupted_at_step"] = int(Path(checkpoint).name.rsplit("-", 1)[1])
        log = root / f"zero{zero_stage}-2.log"
        second = launch(config, log)
        code = _wait(second, log, 900)
        if code != ExitCode.OK:
            raise RuntimeError(f"the resumed run exited {code}:\n" + _tail(log))
        if f"resuming from {checkpoint}" not in log.read_text(errors="replace"):
            raise RuntimeError(f"the second start did not resume from {checkpoint}:\n" + _tail(log))
        figures["resumed_from"] = Path(checkpoint).name
    else:
        code = _wait(first, log, 900)
        if code != ExitCode.OK:
            raise RuntimeError(f"exit {code}:\n" + _tail(log))
    result = RunResult.model_validate_json(run_dir.result.read_text())
    if result.train_steps != steps:
        raise RuntimeError(f"trained {result.train_steps} steps, expected {steps}")
    return figures | {"train_steps": result.train_steps, "tokens_seen": result.tokens_seen,
                      "tokens_per_second_last_attempt": result.tokens_per_second, "wall_seconds": result.wall_seconds,
                      "dev_accuracy": result.metrics.get("dev.accuracy"), "parameter_count": result.parameter_count,
                      "precision": "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32",
                      "final_checkpoint": (run_dir.model / "config.json").is_file()}


def benchmark(root: Path, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    out = root / f"{script}.json"
    log = root / f"{script}.log"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    with log.open("wb") as f:
        code = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--json", str(out)],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=root).returncode
    if code != 0 or not out.is_file():
        raise RuntimeError(f"{script} exited {code}:\n" + _tail(log))
    figures: dict[str, Any] = json.loads(out.read_text())
    figures["printed"] = [line for line in log.read_text(errors="replace").splitlines()
                          if not line.startswith(("{", "Loading", "Writing")) and "Warning" not in line][-20:]
    return figures


# --- the report --------------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    steps = data["steps"]
    env = steps.get("environment", {}).get("figures") or {}
    device = env.get("device", {})
    versions = env.get("versions", {})
    lines = [f"## GPU check: {device.get('name', '?')} ({data['started_at'][:10]})", "",
             "    make gpu-check      # bash benchmarks/gpu_check.sh", ""]
    if versions:
        lines.append("Software: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
        lines.append("")
    lines += ["| step | status | seconds | figures |", "|---|---|---|---|"]
    for name, s in steps.items():
        f = s.get("figures") or {}
        if name.startswith("trainer"):
            what = (f"micro batch {f.get('micro_batch_size')} x {f.get('accumulation')} ({f.get('micro_batch')}),"
                    f" {f.get('precision')}, {f.get('attention')}, {f.get('train_steps')} steps,"
                    f" {f.get('tokens_per_second_last_attempt', 0):,.0f} real tokens/s")
            if "resumed_from" in f:
                what += f"; stopped by SIGTERM at step {f['interrupted_at_step']}, resumed from {f['resumed_from']}"
        elif s["status"] != "ok":
            what = s.get("error", "").splitlines()[0][:200] if s.get("error") else ""
        else:
            what = ""
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {what} |")
    train = (steps.get("training benchmark") or {}).get("figures")
    if train:
        lines += ["", f"Training throughput ({train['data']['steps']} steps of {train['data']['batch_size']} rows,"
                  f" {train['repeats']} interleaved rounds after {train['warmup_rounds']} warm-up round(s); medians):",
                  "", "| trainer | real tokens/s (median) | lowest | highest | padding | MFU |",
                  "|---|---|---|---|---|---|"]
        for name, t in train["trainers"].items():
            mfu = f"{t['mfu']:.1%}" if "mfu" in t else "—"
            lines.append(f"| {name} | {t['median_tokens_per_second']:,.0f} | {t['min']:,.0f} | {t['max']:,.0f} |"
                         f" {t['padding']:.1%} | {mfu} |")
        lines.append("")
        for name, r in train["ratios"].items():
            low, high = r["interval_95"]
            lines.append(f"- xstilts / {name}: **{r['ratio']:.2f}x** (95 % interval {low:.2f}-{high:.2f}; goal"
                         f" {r['goal']}x: {'met' if r['met'] else 'not met'})")
        if train.get("peak_bf16_flops"):
            lines.append(f"- MFU = 6 x {train['model']['nonembedding_parameters']:,} non-embedding parameters x real"
                         f" tokens/s against {train['peak_bf16_flops'] / 1e12:,.0f} TFLOP/s, the dense bf16 peak of"
                         f" the {train['peak_name']} (goal 40 %)")
    ev = (steps.get("evaluation benchmark") or {}).get("figures")
    if ev:
        naive, ours = ev["naive"]["examples_per_second"], ev["xstilts"]["examples_per_second"]
        lines += ["", f"Evaluation ({ev['examples']:,} XNLI-like examples, 15 languages): naive"
                  f" {naive:,.0f} examples/s, xstilts {ours:,.0f},"
                  f" **{ev['ratio']:.2f}x** (goal 3x); accuracy difference {ev['accuracy_difference']:.4f}."]
    if data["degraded"]:
        lines += ["", "Degraded (recorded, not failed):", ""] + [f"- {d}" for d in data["degraded"]]
    return "\n".join(lines) + "\n"


def run(out: Path, profile_name: str | None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    profile = {"gpu": GPU, "cpu": CPU}[profile_name or ("gpu" if cuda else "cpu")]
    out = out.resolve()  # the steps run their processes from other directories
    out.mkdir(parents=True, exist_ok=True)
    root = out / "work"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    check = Check(out, profile)
    site = os.environ.get("XSTILTS_GPU_SITE")
    if site and (Path(site) / "install.json").is_file():
        check.data["install"] = json.loads((Path(site) / "install.json").read_text())
    env = check.step("environment", lambda: environment(check))
    prepared = check.step("model and data", lambda: prepare(root, profile))
    if env and prepared:
        check.step("trainer ZeRO-2, SIGTERM, resume", lambda: trainer_run(root, profile, 2, interrupt=True))
        shutil.rmtree(root / "zero2", ignore_errors=True)  # checkpoints of a large model fill the disk
        check.step("trainer ZeRO-3", lambda: trainer_run(root, profile, 3, interrupt=False))
        shutil.rmtree(root / "zero3", ignore_errors=True)
    check.step("training benchmark", lambda: benchmark(root, "train_throughput", [
        "--model", profile.model, "--steps", str(profile.bench_steps), "--repeats", str(profile.bench_repeats),
        "--warmup-rounds", str(profile.bench_warmup)], timeout=900))
    check.step("evaluation benchmark", lambda: benchmark(root, "eval_throughput", [
        "--model", profile.model, "--per-language", str(profile.eval_per_language),
        "--repeats", str(profile.eval_repeats)], timeout=600))
    check.save()
    (out / "gpu-check.md").write_text(markdown(check.data))
    print((out / "gpu-check.md").read_text())
    print(f"gpu check: figures in {out / 'gpu-check.json'}, the RESULTS.md section in {out / 'gpu-check.md'}")
    if check.failed:
        print(f"gpu check: FAILED steps: {', '.join(check.failed)}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("install", help="the carried wheels into a private directory, offline")
    p.add_argument("bundle", type=Path)
    p.add_argument("site", type=Path)
    p = sub.add_parser("run", help="the check (with the private directory on PYTHONPATH)")
    p.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    p.add_argument("--profile", choices=("gpu", "cpu"), help="default: gpu when CUDA is present, else cpu")
    args = parser.parse_args()
    if args.phase == "install":
        report = install(args.bundle, args.site)
        print(f"gpu check: installed {len(report['installed'])} wheels into {args.site}"
              f" (kept the machine's {', '.join(report['kept_from_machine']) or 'none'})")
        return 0
    return run(args.out, args.profile)


if __name__ == "__main__":
    sys.exit(main())
