"""A real one-node Kubernetes cluster on this machine, for the end-to-end tests.

The control plane is :class:`ControlPlane` from ``tests/cluster/kube/kube_cluster.py`` (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler), advertised on a private
address of a dummy interface so that pods reach the API through the ``kubernetes``
Service. On top of it this module runs the node:

* **containerd** and **runc** (Debian packages) with the CNI plugins (Debian's
  ``containernetworking-plugins``: bridge + host-local), on a socket of its own;
* the **kubelet** and **kube-proxy** (iptables mode), built from Go modules by
  ``scripts/build-node.sh`` at the API server's version;
* **CoreDNS** (same script), serving ``cluster.local`` on the node address, which
  is the pods' nameserver;
* the sandbox ("pause") image, made here from the static ``pause`` binary of the
  same build (the upstream image cannot be pulled), and the images that
  ``scripts/build-images.sh`` exported, imported into containerd's ``k8s.io``
  namespace.

The node takes some host-wide things, which :meth:`NodeCluster.stop` undoes: the
dummy interface and the bridge, iptables/nftables rules (saved before and restored),
sysctls (saved and restored), ``/run/netns/cni-*`` namespaces, mounts under its
directories, the kubelet's fixed ``/var/lib/kubelet/device-plugins`` path and the
hostPath directory ``HOST_DATA`` that the test overlay's volumes use. One node
cluster per machine at a time (a lock file says so).

Containerd's image store lives in the cache (``$XSTILTS_K8S_CACHE``, default
``~/.cache/xstilts``, under ``node/containerd``) so that imported images survive a
session; everything else lives in a temporary work directory.

Needs root, Linux, and ``scripts/setup-node-deps.sh`` + ``scripts/build-node.sh``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "kube"))

from kube_cluster import (
    BinariesNotFound,
    ControlPlane,
    ControlPlaneError,
    _die_with_parent,
    _free_port,
    _Proc,
    _tail,
    find_bin_dir,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_NODE = REPO_ROOT / "scripts" / "build-node.sh"
BUILD_IMAGES = REPO_ROOT / "scripts" / "build-images.sh"
NODE_BINARIES = ("kubelet", "kube-proxy", "pause", "coredns")
HOST_BINARIES = ("containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "iptables-save",
                 "iptables-restore", "nft", "ip")
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))

NODE_NAME = "xstilts-node"
#: The node's address: a /32 on a dummy interface, so nothing leaves this machine.
NODE_IP = "10.240.0.1"
DUMMY_IF = "xstilts0"
BRIDGE_IF = "xstilts-br0"
POD_SUBNET = "10.244.0.0/24"
CLUSTER_DOMAIN = "cluster.local"
RUN_DIR = Path("/run/xstilts-e2e")
#: hostPath volumes of k8s/overlays/test live here (made by start(), removed by stop()).
HOST_DATA = Path("/var/lib/xstilts-e2e")
HOST_DATA_DIRS = {"runs": 1000, "mlflow-artifacts": 1000, "postgres": 999}
PAUSE_IMAGE = "localhost/xstilts/pause:e2e"
K8S_NAMESPACE = "k8s.io"

SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/bridge/bridge-nf-call-ip6tables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw", "security")


class NodeUnavailable(BinariesNotFound):
    """Something the node needs is missing (binaries not built, packages, not root)."""


def cache_root() -> Path:
    return Path(os.environ.get("XSTILTS_K8S_CACHE") or Path.home() / ".cache" / "xstilts")


def _script_dir(script: Path, what: str) -> Path:
    if shutil.which("go") is None and script == BUILD_NODE:
        raise NodeUnavailable("go is not installed, so the node binaries cannot be located")
    proc = subprocess.run(["bash", str(script), "--print-dir"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise NodeUnavailable(f"{script.name} --print-dir failed: {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


def find_node_bin_dir() -> Path:
    """``XSTILTS_NODE_BIN``, else the cache directory of ``scripts/build-node.sh``."""
    env = os.environ.get("XSTILTS_NODE_BIN")
    bin_dir = Path(env) if env else _script_dir(BUILD_NODE, "node binaries")
    missing = [b for b in NODE_BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise NodeUnavailable(
            f"node binaries not built ({', '.join(missing)} missing in {bin_dir}); run scripts/build-node.sh"
        )
    return bin_dir


def find_image_dir() -> Path:
    """The directory of OCI archives made by ``scripts/build-images.sh`` (``images.json``
    maps each image name to its archive)."""
    env = os.environ.get("XSTILTS_IMAGES_DIR")
    image_dir = Path(env) if env else _script_dir(BUILD_IMAGES, "images")
    if not (image_dir / "images.json").is_file():
        raise NodeUnavailable(f"images not built (no {image_dir / 'images.json'}); run scripts/build-images.sh")
    return image_dir


def check_host() -> None:
    """Raise :class:`NodeUnavailable` when this machine cannot run the node."""
    if not sys.platform.startswith("linux"):
        raise NodeUnavailable("the node runs on Linux only")
    if os.geteuid() != 0:
        raise NodeUnavailable("the node needs root (containerd, network namespaces, iptables)")
    missing = [b for b in HOST_BINARIES if shutil.which(b) is None]
    if not any((d / "bridge").exists() for d in CNI_DIRS):
        missing.append("CNI plugins")
    if missing:
        raise NodeUnavailable(f"missing {', '.join(missing)}; run scripts/setup-node-deps.sh")


# --------------------------------------------------------------------------- OCI


def pause_image_archive(pause_binary: Path, dest: Path, name: str = PAUSE_IMAGE) -> Path:
    """An OCI image archive holding only ``/pause`` (entrypoint), named ``name``."""

    def blob(data: bytes) -> tuple[str, bytes]:
        return "sha256:" + hashlib.sha256(data).hexdigest(), data

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = pause_binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    layer_digest, layer = blob(gzip.compress(raw.getvalue(), mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_digest, config_bytes = blob(json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config_bytes)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": len(layer)}],
    }
    manifest_digest, manifest_bytes = blob(json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        }],
    }
    with tarfile.open(dest, "w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for digest, data in ((layer_digest, layer), (config_digest, config_bytes),
                             (manifest_digest, manifest_bytes)):
            add("blobs/sha256/" + digest.split(":", 1)[1], data)
    return dest


def archive_digest(archive: Path) -> str:
    """The manifest digest of a single-image OCI archive (from its index.json)."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    return str(index["manifests"][0]["digest"])


# --------------------------------------------------------------------------- DNS


def dns_query_a(server: str, name: str, port: int = 53, timeout: float = 2.0) -> list[str]:
    """The A records of ``name`` from ``server`` (one UDP query; [] for none)."""
    qid = random.randrange(1 << 16)
    packet = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        packet += bytes([len(label)]) + label.encode()
    packet += b"\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (server, port))
        data, _ = s.recvfrom(4096)
    rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", data[:12])
    if rid != qid or flags & 0xF:  # RCODE != NOERROR
        return []
    pos = 12

    def skip_name(p: int) -> int:
        while True:
            n = data[p]
            if n == 0:
                return p + 1
            if n & 0xC0 == 0xC0:
                return p + 2
            p += n + 1

    for _ in range(qd):
        pos = skip_name(pos) + 4
    out = []
    for _ in range(an):
        pos = skip_name(pos)
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[pos:pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            out.append(socket.inet_ntoa(data[pos:pos + 4]))
        pos += rdlen
    return out


# --------------------------------------------------------------------------- the cluster


def _run(*cmd: str, check: bool = True, input: str | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise ControlPlaneError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


class NodeCluster:
    """A control plane plus one real node. Use as a context manager, or start()/stop().

    After :meth:`start`: ``control_plane`` (the :class:`ControlPlane`: ``kubectl``,
    ``api``, ``kubeconfig`` ...), ``workdir``, ``images`` (name -> reference of every
    image imported from ``scripts/build-images.sh``), ``timings`` (step -> seconds).
    """

    def __init__(
        self,
        *,
        bin_dir: Path | None = None,
        node_bin_dir: Path | None = None,
        image_dir: Path | None = None,
        workdir: Path | str | None = None,
        startup_timeout: float = 180.0,
    ) -> None:
        check_host()
        self.bin_dir = bin_dir or find_bin_dir()
        self.node_bin_dir = node_bin_dir or find_node_bin_dir()
        self.image_dir = image_dir
        self.startup_timeout = startup_timeout
        self._given_workdir = Path(workdir) if workdir else None
        self.workdir: Path | None = None
        self.control_plane: ControlPlane | None = None
        self.images: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._procs: list[_Proc] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._lock_fh: Any = None
        self.containerd_root = cache_root() / "node" / "containerd"
        self.socket = RUN_DIR / "containerd.sock"

    def __enter__(self) -> NodeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------

    def ctr(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return _run("ctr", f"--address={self.socket}", f"--namespace={K8S_NAMESPACE}", *args, check=check,
                    timeout=timeout)

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert self.control_plane is not None
        return self.control_plane.kubectl(*args, **kwargs)

    def _step(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    def _spawn(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> _Proc:
        assert self.workdir is not None
        log = self.workdir / "logs" / f"{name}.log"
        full_env = dict(os.environ)
        full_env.pop("KUBECONFIG", None)
        full_env.update(env or {})
        exe = args[0] if "/" in args[0] else shutil.which(args[0]) or args[0]
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [exe, *args[1:]], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                cwd=self.workdir, env=full_env, start_new_session=True, preexec_fn=_die_with_parent,
            )
        proc = _Proc(name, popen, log, list(args), env)
        self._procs.append(proc)
        return proc

    def _wait(self, what: str, check: Callable[[], Any], timeout: float, proc: _Proc | None = None) -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            if proc is not None and proc.popen.poll() is not None:
                raise ControlPlaneError(f"{proc.name} exited ({proc.popen.returncode}):\n{_tail(proc.log)}")
            try:
                value = check()
                if value:
                    return value
            except Exception as e:
                last = e
            if time.monotonic() > deadline:
                tail = f"\n{_tail(proc.log)}" if proc else ""
                raise ControlPlaneError(f"{what}: not reached in {timeout:.0f}s (last error: {last}){tail}")
            time.sleep(0.25)

    def logs(self, component: str, lines: int = 60) -> str:
        if self.workdir is None:
            return ""
        return _tail(self.workdir / "logs" / f"{component}.log", lines)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> NodeCluster:
        t_all = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._step("cluster ready", t_all)
        return self

    def _start(self) -> None:
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(RUN_DIR / "lock", "w")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ControlPlaneError(f"another node cluster runs on this machine ({RUN_DIR / 'lock'})") from None
        if self._given_workdir:
            self._given_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._given_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="xstilts-node-"))
        wd = self.workdir
        (wd / "logs").mkdir(exist_ok=True)

        self._save_host_state()
        self._setup_network()

        t0 = time.monotonic()
        cp = self.control_plane = ControlPlane(
            bin_dir=self.bin_dir, nodes=0, advertise_address=NODE_IP, workdir=wd / "control-plane",
            startup_timeout=self.startup_timeout,
        )
        cp.start()
        self._step("control plane", t0)
        assert cp.kubeconfig is not None and cp.ca_cert is not None

        t0 = time.monotonic()
        self._start_containerd()
        self._step("containerd", t0)

        t0 = time.monotonic()
        self._import_images()
        self._step("images imported", t0)

        t0 = time.monotonic()
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_coredns()
        cp.wait_nodes_ready([NODE_NAME], timeout=self.startup_timeout)
        self._wait("kubernetes Service endpoints", self._kubernetes_endpoints, 60)
        self._wait("cluster DNS", lambda: dns_query_a(NODE_IP, f"kubernetes.default.svc.{CLUSTER_DOMAIN}"), 60)
        self._step("node Ready, DNS", t0)

    # -- host state -----------------------------------------------------------

    def _save_host_state(self) -> None:
        saved: dict[str, str] = {}
        for key in SYSCTLS:
            path = Path("/proc/sys") / key
            with contextlib.suppress(OSError):
                saved[key] = path.read_text()

        def restore_sysctls() -> None:
            for key, value in saved.items():
                path = Path("/proc/sys") / key
                with contextlib.suppress(OSError):
                    if path.read_text() != value:
                        path.write_text(value)

        self._undo.append(("sysctls", restore_sysctls))

        saves = {cmd: _run(cmd, check=False) for cmd in ("iptables-save", "ip6tables-save") if shutil.which(cmd)}
        tables_before = set(self._nft_tables())

        def restore_firewall() -> None:
            for cmd, text in saves.items():
                tool = cmd.replace("-save", "")
                present = {line[1:] for line in text.splitlines() if line.startswith("*")}
                for table in IPTABLES_TABLES:
                    if table not in present:
                        _run(tool, "-t", table, "-F", check=False)
                        _run(tool, "-t", table, "-X", check=False)
                if text.strip():
                    _run(cmd.replace("-save", "-restore"), input=text, check=False)
            for family, name in set(self._nft_tables()) - tables_before:
                _run("nft", "delete", "table", family, name, check=False)

        self._undo.append(("firewall", restore_firewall))

        netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()

        def remove_netns() -> None:
            if not os.path.isdir("/run/netns"):
                return
            for name in set(os.listdir("/run/netns")) - netns_before:
                path = f"/run/netns/{name}"
                _run("umount", "-l", path, check=False)
                with contextlib.suppress(OSError):
                    os.unlink(path)

        self._undo.append(("network namespaces", remove_netns))

        created_var_lib_kubelet = not os.path.exists("/var/lib/kubelet")
        if created_var_lib_kubelet:
            self._undo.append(("/var/lib/kubelet", lambda: shutil.rmtree("/var/lib/kubelet", ignore_errors=True)))

    @staticmethod
    def _nft_tables() -> list[tuple[str, str]]:
        out = _run("nft", "list", "tables", check=False)
        tables = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "table":
                tables.append((parts[1], parts[2]))
        return tables

    def _setup_network(self) -> None:
        for name in (DUMMY_IF, BRIDGE_IF):  # leftovers of a killed run
            _run("ip", "link", "delete", name, check=False)
        # A dummy interface where the kernel has the module; else an empty bridge does as well.
        if subprocess.run(["ip", "link", "add", DUMMY_IF, "type", "dummy"], capture_output=True).returncode:
            _run("ip", "link", "add", DUMMY_IF, "type", "bridge")
        self._undo.append(("dummy interface", lambda: _run("ip", "link", "delete", DUMMY_IF, check=False)))
        self._undo.append(("bridge", lambda: _run("ip", "link", "delete", BRIDGE_IF, check=False)))
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", DUMMY_IF)
        _run("ip", "link", "set", DUMMY_IF, "up")
        # Pods reach Services and the node through the bridge's gateway.
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if bridge_nf.exists():
            bridge_nf.write_text("1\n")

        if HOST_DATA.exists():
            shutil.rmtree(HOST_DATA)
        HOST_DATA.mkdir(parents=True)
        HOST_DATA.chmod(0o755)
        # The hostPath volumes of k8s/overlays/test, owned by the uids their pods run as.
        for sub, uid in HOST_DATA_DIRS.items():
            (HOST_DATA / sub).mkdir()
            os.chown(HOST_DATA / sub, uid, uid)
        self._undo.append(("host data", lambda: shutil.rmtree(HOST_DATA, ignore_errors=True)))

    # -- containerd -------------------------------------------------------------

    def _start_containerd(self) -> None:
        assert self.workdir is not None
        wd = self.workdir
        cni_bin = next(str(d) for d in CNI_DIRS if (d / "bridge").exists())
        (wd / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
        conflist = {
            "cniVersion": "1.0.0",
            "name": "xstilts-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE_IF,
                    "isGateway": True,
                    "ipMasq": False,  # nothing leaves the machine
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(wd / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (wd / "cni" / "net.d" / "10-xstilts.conflist").write_text(json.dumps(conflist, indent=2))
        self.containerd_root.mkdir(parents=True, exist_ok=True)
        state = RUN_DIR / "containerd"
        config = f"""\
version = 2
root = "{self.containerd_root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{self.socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{wd / 'containerd-opt'}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # root here lacks CAP_SYS_RESOURCE: runc cannot set a negative oom_score_adj.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{wd / 'cni' / 'net.d'}"
"""
        (wd / "containerd.toml").write_text(config)
        self._undo.append(("containerd containers", self._remove_containers))
        self._undo.append(("mounts", self._unmount_all))
        proc = self._spawn("containerd", ["containerd", f"--config={wd / 'containerd.toml'}", "--log-level=warn"])
        self._wait("containerd", lambda: self.ctr("version", check=False).strip(), 60, proc)

    def _remove_containers(self) -> None:
        """Kill and delete every task and container in the k8s.io namespace (the pods
        of this cluster; CRI state lives in containerd's store)."""
        if not self.socket.exists():
            return
        out = self.ctr("tasks", "ls", "-q", check=False, timeout=60)
        for cid in out.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        for cid in out.split():
            self.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        for cid in self.ctr("containers", "ls", "-q", check=False, timeout=60).split():
            self.ctr("containers", "delete", cid, check=False, timeout=30)

    def _unmount_all(self) -> None:
        """Unmount whatever is still mounted under this cluster's directories."""
        roots = [str(p) for p in (self.workdir, RUN_DIR, self.containerd_root, HOST_DATA, Path("/var/lib/kubelet"))
                 if p is not None]
        with open("/proc/self/mounts") as fh:
            points = [line.split()[1].replace("\\040", " ") for line in fh]
        for point in sorted(points, key=len, reverse=True):
            if any(point == r or point.startswith(r + "/") for r in roots):
                _run("umount", "-l", point, check=False)

    def _import_images(self) -> None:
        assert self.workdir is not None
        existing = self._image_digests()
        pause = pause_image_archive(self.node_bin_dir / "pause", self.workdir / "pause.oci.tar")
        archives: list[tuple[str, str, Path]] = [("pause", PAUSE_IMAGE, pause)]
        image_dir = self.image_dir
        if image_dir is None:
            with contextlib.suppress(NodeUnavailable):
                image_dir = find_image_dir()
        if image_dir is not None:
            listing = json.loads((image_dir / "images.json").read_text())
            for name, entry in listing.items():
                archives.append((name, entry["ref"], image_dir / entry["archive"]))
        for name, ref, archive in archives:
            if existing.get(ref) != archive_digest(archive):
                self.ctr("images", "import", "--snapshotter=overlayfs", str(archive), timeout=900)
            self.images[name] = ref
        missing = [ref for ref in self.images.values() if ref not in self._image_digests()]
        if missing:
            raise ControlPlaneError(f"images not in containerd after import: {missing}")

    def _image_digests(self) -> dict[str, str]:
        out = self.ctr("images", "ls", check=False)
        digests = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                digests[parts[0]] = parts[2]
        return digests

    # -- kubelet, kube-proxy, CoreDNS -----------------------------------------------

    def _node_kubeconfig(self) -> Path:
        """A client certificate for the kubelet (CN system:node:<name>, O system:nodes)
        signed by the cluster CA, and ``system:node`` bound to the group (RBAC only)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        cp = self.control_plane
        assert cp is not None and cp.workdir is not None and cp.ca_cert is not None and self.workdir is not None
        ca_cert = x509.load_pem_x509_certificate(cp.ca_cert.read_bytes())
        ca_key: Any = serialization.load_pem_private_key((cp.workdir / "pki" / "ca.key").read_bytes(), None)
        key = ec.generate_private_key(ec.SECP256R1())
        now = _dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{NODE_NAME}"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
            ]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _dt.timedelta(days=7))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pki = self.workdir / "node-pki"
        pki.mkdir(exist_ok=True)
        (pki / "node.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / "node.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (pki / "node.key").chmod(0o600)
        config = json.loads(Path(cp.kubeconfig).read_text())  # type: ignore[arg-type]
        config["users"] = [{"name": "node", "user": {"client-certificate": str(pki / "node.crt"),
                                                     "client-key": str(pki / "node.key")}}]
        config["contexts"][0]["context"]["user"] = "node"
        path = self.workdir / "kubelet.kubeconfig"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        cp.apply({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "xstilts-e2e-nodes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
        })
        return path

    def _start_kubelet(self) -> None:
        cp = self.control_plane
        assert cp is not None and self.workdir is not None and cp.ca_cert is not None
        wd = self.workdir
        kubeconfig = self._node_kubeconfig()
        (wd / "resolv.conf").write_text(f"nameserver {NODE_IP}\n")
        healthz = _free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": _free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(cp.ca_cert)},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(wd / "resolv.conf"),
            "podLogsDir": str(wd / "pod-logs"),
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "protectKernelDefaults": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "shutdownGracePeriod": "0s",
            "registerNode": True,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "5s",
            "fileCheckFrequency": "5s",
            "maxPods": 110,
            "localStorageCapacityIsolation": True,
        }
        (wd / "kubelet.yaml").write_text(json.dumps(config, indent=2))
        proc = self._spawn("kubelet", [
            str(self.node_bin_dir / "kubelet"),
            f"--config={wd / 'kubelet.yaml'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={wd / 'kubelet'}",
            f"--cert-dir={wd / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ])
        self._undo.append(("kubelet cgroups", self._remove_kubepods_cgroups))
        self._wait("kubelet healthz", lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"), 60, proc)

    @staticmethod
    def _remove_kubepods_cgroups() -> None:
        root = Path("/sys/fs/cgroup")
        for hierarchy in [root, *root.iterdir()] if root.is_dir() else []:
            top = hierarchy / "kubepods"
            if not top.is_dir():
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda t: len(t[0]), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)

    def _start_kube_proxy(self) -> None:
        cp = self.control_plane
        assert cp is not None and self.workdir is not None
        healthz = _free_port()
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "iptables",
            "clientConnection": {"kubeconfig": str(cp.kubeconfig)},
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{healthz}",
            "metricsBindAddress": f"127.0.0.1:{_free_port()}",
            "clusterCIDR": POD_SUBNET,
            # Service traffic is masqueraded, so replies from a pod on the same bridge
            # go back through the node.
            "iptables": {"masqueradeAll": True, "localhostNodePorts": False},
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the host's conntrack sysctls alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }
        (self.workdir / "kube-proxy.yaml").write_text(json.dumps(config, indent=2))
        proc = self._spawn("kube-proxy", [str(self.node_bin_dir / "kube-proxy"),
                                          f"--config={self.workdir / 'kube-proxy.yaml'}", "--v=1"])
        self._wait("kube-proxy healthz", lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz", any_status=True),
                   60, proc)

    def _start_coredns(self) -> None:
        cp = self.control_plane
        assert cp is not None and self.workdir is not None
        ready = _free_port()
        corefile = f"""\
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{_free_port()}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {cp.kubeconfig} xstilts-test
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        (self.workdir / "Corefile").write_text(corefile)
        proc = self._spawn("coredns", [str(self.node_bin_dir / "coredns"), "-conf", str(self.workdir / "Corefile")])
        self._wait("CoreDNS ready", lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"), 60, proc)

    def _kubernetes_endpoints(self) -> bool:
        assert self.control_plane is not None
        ep = self.control_plane.api("GET", "/api/v1/namespaces/default/endpoints/kubernetes")
        return any(a.get("ip") == NODE_IP for s in ep.get("subsets") or [] for a in s.get("addresses") or [])

    # -- teardown ---------------------------------------------------------------

    def stop(self) -> None:
        """Stop the node (kubelet first, then every container, containerd), the
        control plane, and undo the host changes; idempotent."""
        for proc in [p for p in self._procs if p.name != "containerd"][::-1]:
            ControlPlane._terminate(proc, grace=5)
        kept = [p for p in self._procs if p.name == "containerd"]
        self._procs = kept
        undo, self._undo = self._undo, []
        # Containers go while containerd still runs; then containerd, then the rest.
        for name, fn in undo[::-1]:
            if name == "containerd containers":
                with contextlib.suppress(Exception):
                    fn()
        for proc in kept:
            ControlPlane._terminate(proc, grace=10)
        self._procs = []
        if self.control_plane is not None:
            self.control_plane.stop()
            self.control_plane = None
        errors = []
        for name, fn in undo[::-1]:
            if name == "containerd containers":
                continue
            try:
                fn()
            except Exception as e:
                errors.append(f"{name}: {e}")
        keep = os.environ.get("XSTILTS_K8S_KEEP", "") not in ("", "0")
        if self.workdir is not None and self._given_workdir is None and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None
        if errors:
            raise ControlPlaneError("teardown: " + "; ".join(errors))


def _http_ok(url: str, any_status: bool = False) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(200 <= resp.status < 300)
    except urllib.error.HTTPError:
        return any_status
    except (urllib.error.URLError, OSError):
        return False


def main(argv: Iterable[str] | None = None) -> int:
    """``python tests/e2e/node_cluster.py``: run the one-node cluster until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir")
    opts = parser.parse_args(list(argv) if argv is not None else None)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    with NodeCluster(workdir=opts.workdir) as nc:
        for step, seconds in nc.timings.items():
            print(f"{step}: {seconds}s", flush=True)
        assert nc.control_plane is not None
        print(f"export KUBECONFIG={nc.control_plane.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
