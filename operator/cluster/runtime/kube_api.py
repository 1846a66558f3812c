"""Thin access to the Kubernetes API for the controller and the cluster commands.

- `connect`: credentials found the way kubectl finds them (an explicit kubeconfig,
  $KUBECONFIG, ~/.kube/config, then the in-cluster service account);
- `Kube`: JSON requests to one resource type at a time (get, list, watch, create, update,
  patch, delete), each with a timeout and retried a few times on transient failures, errors
  as `KubeError` with the API's own message, and a tally of every (API group, resource, verb)
  called, which the RBAC test compares with the Role;
- `Reflector`: a list + watch cache of one resource type (410 Gone → re-list).

Objects are plain dicts in their JSON form, never the client's generated model classes:
reconcile reads them as such, and decoding 10,000 Jobs into models would cost seconds.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from xstilts.operator.experiment.spec import API_GROUP, KIND

log = logging.getLogger("xstilts.kube")

IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Connect timeout, and the default read timeout of ordinary requests: a request the API
# server (or a proxy on the way) never answers must not hold the controller's only worker,
# nor its Lease renewal. Watches wait this long for their first answer only (see Kube.watch).
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0
# Failures that another attempt may not meet: the API server not reached (refused, dropped,
# timed out), throttled (429) or briefly unavailable. Every write the controller retries is
# safe to repeat: creates have fixed names (a repeat finds AlreadyExists, which callers read
# back) and updates carry a resourceVersion (a repeat of one that landed meets a Conflict);
# only an Event, named at random, may be recorded twice.
TRANSIENT_STATUSES = frozenset({0, 429, 500, 502, 503, 504})
ATTEMPTS = 3
RETRY_AFTER_CAP = 5.0
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
# Ask for metadata only (PartialObjectMetadataList): listing a run's ConfigMaps to find
# orphans should not download every run.json.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
# One object's metadata only (a Secret's existence, without its values).
METADATA_ONLY_OBJECT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


# --- resources ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    group: str  # "" for the core API
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        """The REST path; no namespace means across all namespaces (lists and watches)."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if subresource:
            base += f"/{subresource}"
        return base


EXPERIMENTS = Resource(API_GROUP, "v1alpha1", "experiments", KIND)
JOBS = Resource("batch", "v1", "jobs", "Job")
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")
SERVICES = Resource("", "v1", "services", "Service")
EVENTS = Resource("", "v1", "events", "Event")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
PODS = Resource("", "v1", "pods", "Pod")
# Only `xstilts submit` (with the user's credentials) asks for Secrets, and only whether they exist.
SECRETS = Resource("", "v1", "secrets", "Secret")
BY_KIND = {r.kind: r for r in (EXPERIMENTS, JOBS, CONFIG_MAPS, SERVICES, EVENTS, LEASES, PODS)}

# HTTP method (and whether a name is given) → the RBAC verb it needs.
_VERBS = {("GET", True): "get", ("GET", False): "list", ("POST", False): "create", ("PUT", True): "update",
          ("PATCH", True): "patch", ("DELETE", True): "delete", ("DELETE", False): "deletecollection"}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    kind = obj.get("kind")
    if kind not in BY_KIND:
        raise ValueError(f"no resource known for kind {kind!r}")
    return BY_KIND[kind]


def key_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


# --- errors ------------------------------------------------------------------------------


class KubeError(Exception):
    """An API request that failed, with the API server's message.
    status 0 means the API server was not reached at all."""

    def __init__(self, status: int, reason: str, message: str, *, what: str = "",
                 retry_after: float | None = None):
        self.status = status
        self.reason = reason
        self.message = message
        self.what = what
        self.retry_after = retry_after  # seconds, from a Retry-After header
        super().__init__(f"{what}: {message}" if what else message)

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        """409 that is a stale resourceVersion (not AlreadyExists)."""
        return self.status == 409 and self.reason != "AlreadyExists"

    @property
    def already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def gone(self) -> bool:
        return self.status == 410

    @property
    def unreachable(self) -> bool:
        return self.status == 0

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES

    @property
    def refused(self) -> bool:
        """The API server refused the request as it is (400 Bad Request, 403 Forbidden, 413 too
        large, 422 Invalid, ...): sending it again unchanged cannot succeed."""
        return 400 <= self.status < 500 and self.status not in (404, 408, 409, 410, 429)


def _error_from_response(status: int, body: bytes, what: str, retry_after: str | None = None) -> KubeError:
    reason, message = "", ""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason, message = str(doc.get("reason") or ""), str(doc.get("message") or "")
    except ValueError:
        message = body.decode(errors="replace").strip()[:500]
    try:
        after = min(RETRY_AFTER_CAP, max(0.0, float(retry_after))) if retry_after else None
    except ValueError:  # an HTTP date: not worth parsing, back off as usual
        after = None
    return KubeError(status, reason, message or f"HTTP {status}", what=what, retry_after=after)


# --- connecting --------------------------------------------------------------------------


class ConfigError(Exception):
    """No usable credentials: one line saying where they were looked for."""


@dataclass
class Connection:
    api_client: Any  # kubernetes.client.ApiClient
    namespace: str  # the kubeconfig context's namespace, or the pod's own
    server: str
    source: str  # which kubeconfig, or "in-cluster"


def connect(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """Credentials like kubectl: --kubeconfig, else $KUBECONFIG, else ~/.kube/config if it
    exists, else the in-cluster service account. Raises ConfigError."""
    from kubernetes import client, config

    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    if path is None and Path("~/.kube/config").expanduser().exists():
        path = str(Path("~/.kube/config").expanduser())
    configuration = client.Configuration()
    if path is not None:
        first = path.split(os.pathsep)[0]
        if not Path(first).expanduser().exists():
            raise ConfigError(f"kubeconfig {first} does not exist; pass --kubeconfig or set KUBECONFIG")
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=context, client_configuration=configuration, persist_config=False)
            _, active = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
            if context:
                contexts, _ = config.list_kube_config_contexts(config_file=path)  # type: ignore[no-untyped-call]
                active = next((c for c in contexts if c.get("name") == context), active)
        except (config.ConfigException, ValueError, TypeError, KeyError, OSError) as e:
            raise ConfigError(f"cannot use kubeconfig {path}: {e}") from None
        namespace = ((active or {}).get("context") or {}).get("namespace") or "default"
        source = path
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException as e:
            raise ConfigError(f"in-cluster configuration failed: {e}") from None
        try:
            namespace = IN_CLUSTER_NAMESPACE_FILE.read_text().strip() or "default"
        except OSError:
            namespace = "default"
        source = "in-cluster"
    else:
        raise ConfigError("no Kubernetes credentials: no --kubeconfig, no $KUBECONFIG, no ~/.kube/config,"
                          " and not running in a cluster")
    # Several watches and a worker share the client's connection pool.
    configuration.connection_pool_maxsize = 16
    # Kube.request retries (with backoff, and only what is safe to repeat); a second layer of
    # retries below it would multiply the attempts and the time a hung API server costs.
    configuration.retries = False
    return Connection(client.ApiClient(configuration), namespace, str(configuration.host), source)


# --- requests ----------------------------------------------------------------------------


class Kube:
    """JSON requests against one API server. Thread-safe: the controller's watches and its
    worker share one instance.

    Each request times out after `timeout` seconds without an answer and is tried up to
    `attempts` times while it fails transiently (TRANSIENT_STATUSES), with a short jittered
    backoff or the server's Retry-After.

    `calls` counts each (API group, resource[/subresource], verb) requested, for the
    metrics and for checking the controller's Role against what the code really does."""

    def __init__(self, connection: Connection, *, timeout: float = REQUEST_TIMEOUT, attempts: int = ATTEMPTS):
        if timeout <= 0 or attempts < 1:
            raise ValueError(f"need a positive request timeout (got {timeout}) and at least one attempt"
                             f" (got {attempts})")
        self.connection = connection
        self.api = connection.api_client
        self.timeout = timeout
        self.attempts = attempts
        self.calls: Counter[tuple[str, str, str]] = Counter()
        self._lock = threading.Lock()

    @property
    def namespace(self) -> str:
        return self.connection.namespace

    def _record(self, resource: Resource, subresource: str | None, verb: str) -> None:
        name = f"{resource.plural}/{subresource}" if subresource else resource.plural
        with self._lock:
            self.calls[(resource.group, name, verb)] += 1

    def _send(self, method: str, path: str, query: Mapping[str, Any] | None, body: Any,
              headers: dict[str, str], timeout: Any, *, stream: bool = False) -> Any:
        """One request; returns the client's RESTResponse, its body read unless `stream`, or
        raises KubeError(0, ...) when the API server cannot be reached or the answer is cut
        or late."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        url = self.connection.server + path
        if query:
            url += "?" + urlencode({k: _query_value(v) for k, v in query.items() if v is not None})
        all_headers = {"Accept": "application/json", **headers}
        if body is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = "application/json"
        # Adds the credentials (token, refreshed for exec plugins and in-cluster tokens).
        self.api.update_params_for_auth(all_headers, [], ["BearerToken"], path, method, body)
        try:
            response = self.api.rest_client.request(method, url, headers=all_headers, body=body,
                                                    _request_timeout=timeout)
            if not stream:
                response.read()  # a connection cut or a timeout mid-body raises here
            return response
        except ApiException as e:  # TLS errors come this way
            raise KubeError(0, "Unreachable", f"cannot reach the Kubernetes API at {self.connection.server}:"
                            f" {(e.reason or str(e)).splitlines()[-1]}") from None
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as e:
            cause = getattr(e, "reason", None) or e
            raise KubeError(0, "Unreachable", f"cannot reach the Kubernetes API at {self.connection.server}:"
                            f" {_short(cause)}") from None

    def _timeout(self, deadline: float | None, timeout: float | None = None) -> tuple[float, float]:
        """(connect, read) timeouts of one attempt: `timeout` or the client's, cut to what
        is left before `deadline` (time.monotonic())."""
        read = min(self.timeout, timeout) if timeout is not None else self.timeout
        if deadline is None:
            return min(CONNECT_TIMEOUT, read), read
        left = deadline - time.monotonic()
        if left <= 0:
            raise KubeError(0, "Timeout", "no time left to ask the Kubernetes API")
        return min(CONNECT_TIMEOUT, read, left), min(read, left)

    def request(self, method: str, resource: Resource, namespace: str | None, name: str | None = None, *,
                subresource: str | None = None, query: Mapping[str, Any] | None = None, body: Any = None,
                content_type: str | None = None, accept: str | None = None,
                deadline: float | None = None, timeout: float | None = None) -> Any:
        """The decoded JSON response; KubeError for any HTTP error status, after up to
        `attempts` tries while it is transient. Each attempt waits at most `timeout` (at
        most the client's) for an answer; `deadline` (time.monotonic()) bounds all attempts
        together: none starts, nor waits for an answer, past it."""
        verb = _VERBS[(method, name is not None)]
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if accept:
            headers["Accept"] = accept
        path = resource.path(namespace, name, subresource)
        what = f"{verb} {resource.plural}{'/' + subresource if subresource else ''}" + (
            f" {namespace}/{name}" if name and namespace else f" {name}" if name else "")

        def attempt() -> Any:
            self._record(resource, subresource, verb)
            response = self._send(method, path, query, body, headers, self._timeout(deadline, timeout))
            data = response.read()
            if not 200 <= response.status < 300:
                raise _error_from_response(response.status, data, what, response.getheader("Retry-After"))
            return json.loads(data) if data else None

        return self._retrying(attempt, what, deadline)

    def _retrying(self, attempt: Callable[[], Any], what: str, deadline: float | None = None) -> Any:
        """attempt(), again after a short backoff while it fails transiently, up to
        `attempts` times and within `deadline`."""
        tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except KubeError as e:
                if not e.transient or tries >= self.attempts:
                    raise
                delay = e.retry_after if e.retry_after is not None else backoff_delay(tries, base=0.2, cap=2.0)
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                log.debug("%s: %s; trying again in %.1fs", what, e, delay)
                time.sleep(delay)

    # verbs ---------------------------------------------------------------------------------

    def get(self, resource: Resource, namespace: str | None, name: str, subresource: str | None = None, *,
            deadline: float | None = None, timeout: float | None = None) -> Any:
        return self.request("GET", resource, namespace, name, subresource=subresource, deadline=deadline,
                            timeout=timeout)

    def list(self, resource: Resource, namespace: str | None, *, selector: str | None = None,
             metadata_only: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = self.request("GET", resource, namespace, query={"labelSelector": selector},
                                           accept=METADATA_ONLY if metadata_only else None)
        return doc

    def create(self, obj: Mapping[str, Any], namespace: str | None = None, *,
               deadline: float | None = None, timeout: float | None = None) -> dict[str, Any]:
        resource = resource_of(obj)
        ns = namespace or (obj.get("metadata") or {}).get("namespace")
        created: dict[str, Any] = self.request("POST", resource, ns, body=dict(obj), deadline=deadline,
                                               timeout=timeout)
        return created

    def replace(self, obj: Mapping[str, Any], subresource: str | None = None, *,
                deadline: float | None = None, timeout: float | None = None) -> dict[str, Any]:
        """PUT: fails with a conflict unless metadata.resourceVersion is current."""
        ns, name = key_of(obj)
        replaced: dict[str, Any] = self.request("PUT", resource_of(obj), ns or None, name,
                                                subresource=subresource, body=dict(obj), deadline=deadline,
                                                timeout=timeout)
        return replaced

    def patch(self, resource: Resource, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, content_type: str = MERGE_PATCH) -> dict[str, Any]:
        patched: dict[str, Any] = self.request("PATCH", resource, namespace, name, subresource=subresource,
                                               body=patch, content_type=content_type)
        return patched

    def delete(self, resource: Resource, namespace: str | None, name: str, *,
               propagation: str | None = "Background", missing_ok: bool = True) -> bool:
        """Delete one object; False if it was already gone (and missing_ok)."""
        body = {"propagationPolicy": propagation} if propagation else None
        try:
            self.request("DELETE", resource, namespace, name, body=body)
        except KubeError as e:
            if e.not_found and missing_ok:
                return False
            raise
        return True

    def watch(self, resource: Resource, namespace: str | None, resource_version: str, *,
              selector: str | None = None, timeout_seconds: int = 300) -> Iterator[dict[str, Any]]:
        """Watch events ({"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}) from
        `resource_version` until the server ends the watch. KubeError(410) when that version
        is too old; KubeError(0) when the stream is cut or goes silent."""
        import urllib3

        self._record(resource, None, "watch")
        query = {"watch": "true", "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": timeout_seconds, "labelSelector": selector}
        # The answer must start within the request timeout, like any request's...
        response = self._send("GET", resource.path(namespace), query, None, {}, self._timeout(None), stream=True)
        if not 200 <= response.status < 300:
            raise _error_from_response(response.status, response.read(), f"watch {resource.plural}")
        raw = response.response
        # ...but events may then be minutes apart: the stream's read timeout only catches a
        # connection that died silently (no bookmark for a while).
        sock = getattr(raw.connection, "sock", None)
        if sock is not None:
            sock.settimeout(timeout_seconds + 30.0)
        try:
            yield from _json_lines(raw)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as e:
            raise KubeError(0, "Unreachable", f"the watch was cut: {_short(getattr(e, 'reason', None) or e)}",
                            what=f"watch {resource.plural}") from None
        finally:
            raw.release_conn()

    def stream(self, resource: Resource, namespace: str, name: str, subresource: str,
               query: Mapping[str, Any]) -> Iterator[bytes]:
        """A streaming GET of a subresource (pod logs), chunk by chunk."""
        self._record(resource, subresource, "get")
        timeout = (CONNECT_TIMEOUT, None) if query.get("follow") else self._timeout(None)
        response = self._send("GET", resource.path(namespace, name, subresource), query, None,
                              {"Accept": "*/*"}, timeout, stream=True)
        if not 200 <= response.status < 300:
            raise _error_from_response(response.status, response.read(), f"get {resource.plural}/{subresource}"
                                       f" {namespace}/{name}")
        raw = response.response
        try:
            yield from raw.stream(65536, decode_content=True)
        finally:
            raw.release_conn()

    def api_available(self, group: str, version: str) -> bool:
        """Whether the API server serves group/version (i.e. a CRD is installed)."""
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        what = f"discover {group}/{version}"

        def attempt() -> bool:
            response = self._send("GET", path, None, None, {}, self._timeout(None))
            data = response.read()
            if response.status == 404:
                return False
            if not 200 <= response.status < 300:
                raise _error_from_response(response.status, data, what, response.getheader("Retry-After"))
            return True

        available: bool = self._retrying(attempt, what)
        return available


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _short(error: Any) -> str:
    text = str(error)
    # urllib3 wraps the cause: "<urllib3.connection.HTTPSConnection object at 0x..>: Failed to
    # establish a new connection: [Errno 111] Connection refused" → the part after the colon.
    if "object at 0x" in text and ": " in text:
        text = text.split(": ", 1)[1]
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def _json_lines(raw: Any) -> Iterator[dict[str, Any]]:
    pending = b""
    for chunk in raw.stream(65536, decode_content=True):
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


# --- list + watch cache ------------------------------------------------------------------

EventHandler = Callable[[str, dict[str, Any], dict[str, Any] | None], None]


@dataclass
class Reflector:
    """Keeps `store` equal to the API's objects of one type (in a namespace, or all, with an
    optional label selector): list, then watch from the list's resourceVersion; on 410 Gone
    or an ERROR event, list again; on a broken connection, watch again (with backoff).

    `on_event(type, obj, old)` is called for every change, including those a re-list
    discovers (a DELETED for each object that vanished while no watch was open), from the
    reflector's thread."""

    kube: Kube
    resource: Resource
    namespace: str | None
    on_event: EventHandler
    selector: str | None = None
    watch_timeout: int = 300
    store: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    synced: threading.Event = field(default_factory=threading.Event)
    relists: int = 0
    errors: int = 0
    last_error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _version: str | None = None  # where the next watch starts; None: list first

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.store.values())

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        with self._lock:
            return self.store.get(key)

    def put(self, obj: dict[str, Any], *, if_newer: bool = False) -> None:
        """Record an object this process just wrote (a created Job, a status update)
        before its watch event arrives, so that the next reconcile sees it. Without
        `if_newer` only an object not cached yet is recorded; with it, also one newer than
        the cached version. The watch event replaces it in any case."""
        key = key_of(obj)
        with self._lock:
            current = self.store.get(key)
            if current is None or (if_newer and newer(obj, current)):
                self.store[key] = obj

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self.store.pop(key, None)

    def run(self, stop: threading.Event) -> None:
        """List and watch until `stop` is set."""
        self._version = None
        backoff = 0.5
        while not stop.is_set():
            before = (self._version, self.relists)
            try:
                if self._version is None:
                    self._version = self._relist()
                    self.synced.set()
                self._watch(stop)
                backoff = 0.5
            except KubeError as e:
                if e.gone:
                    log.info("%s watch expired (410 Gone); listing again", self.resource.plural)
                    self._version = None
                    continue
                self.errors += 1
                self.last_error = str(e)
                # A watch that was cut after it delivered events made progress: the backoff
                # starts afresh, so that flaky connections do not leave the cache stale for long.
                if (self._version, self.relists) != before:
                    backoff = 0.5
                log.warning("%s: %s; retrying in %.1fs", self.resource.plural, e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            except (ValueError, OSError) as e:  # a line of the stream cut in the middle, a socket error
                self.errors += 1
                self.last_error = str(e)
                log.info("%s watch interrupted (%s); watching again", self.resource.plural, _short(e))
                stop.wait(0.5)

    def _relist(self) -> str:
        doc = self.kube.list(self.resource, self.namespace, selector=self.selector)
        self.relists += 1
        fresh: dict[tuple[str, str], dict[str, Any]] = {}
        for item in doc.get("items") or []:
            # List items lack apiVersion and kind; events and parsers expect them.
            item.setdefault("apiVersion", self.resource.api_version)
            item.setdefault("kind", self.resource.kind)
            fresh[key_of(item)] = item
        with self._lock:
            old = self.store
            self.store = fresh
        for key, obj in fresh.items():
            before = old.get(key)
            if before is None:
                self.on_event("ADDED", obj, None)
            elif _version(before) != _version(obj):
                self.on_event("MODIFIED", obj, before)
        for key, obj in old.items():
            if key not in fresh:
                self.on_event("DELETED", obj, obj)
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self, stop: threading.Event) -> None:
        """Watch from `_version`, which follows each event: a watch cut midway resumes
        where it stopped, without replaying what the cache already has."""
        # Spread watch restarts so that many controllers do not re-watch in lockstep.
        timeout = int(self.watch_timeout * (0.8 + 0.4 * random.random()))
        assert self._version is not None
        for event in self.kube.watch(self.resource, self.namespace, self._version, selector=self.selector,
                                     timeout_seconds=timeout):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                status = obj if isinstance(obj, dict) else {}
                raise KubeError(int(status.get("code") or 500), str(status.get("reason") or ""),
                                str(status.get("message") or "watch error"), what=f"watch {self.resource.plural}")
            self._version = _version(obj) or self._version
            if kind == "BOOKMARK":
                continue
            key = key_of(obj)
            with self._lock:
                before = self.store.get(key)
                if kind == "DELETED":
                    self.store.pop(key, None)
                else:
                    self.store[key] = obj
            self.on_event(str(kind), obj, before)
            if stop.is_set():
                break


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def newer(candidate: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether `candidate` is a later version of the object than `current`. Resource
    versions are etcd revisions: compared as numbers when both are (as client-go's
    mutation cache does), else the candidate wins."""
    a, b = _version(candidate), _version(current)
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return True


def backoff_delay(attempt: int, base: float = 0.5, cap: float = 60.0) -> float:
    """Exponential backoff with jitter for retrying a failed reconcile."""
    return float(min(cap, base * 2 ** max(0, attempt - 1)) * (0.75 + 0.5 * random.random()))
