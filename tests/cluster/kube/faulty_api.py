"""A fault-injecting HTTPS proxy in front of the real kube-apiserver, for the controller's
fault tests.

The controller reaches it through an ordinary kubeconfig (`kubeconfig_via`: the same
credentials and CA, another server URL); the proxy serves the API server's own certificate,
forwards each request to the API server with the caller's credentials and relays the answer,
unless a rule the test set says otherwise:

    api = FaultyAPI(cp).start()
    api.add(Rule("status", status=503, rate=0.1))                      # any call, 10%
    api.add(Rule("drop_response", methods={"POST"}, path=r"/jobs$", count=1))
    api.add(Rule("expire_watch", watch=True, path=r"/jobs$", count=2))   # the server says 410

Actions:
- ``status``: answer `status` (500, 503, 429 with Retry-After, 409, 410...) with a Status body,
  without forwarding;
- ``hang``: never answer (the caller's timeout must end it), then close;
- ``drop``: close the connection without forwarding or answering;
- ``drop_response``: forward, let the API server act, then close without answering: the
  write happened, the caller never saw it (`then` runs in between, e.g. to kill it);
- ``cut``: forward and relay the response (a watch's stream) for `after` seconds, then cut it;
- ``expire_watch``: forward a watch from resourceVersion "1", which the API server no longer
  serves: its own 410 Gone reaches the caller;
- ``barrier``: hold the request until `parties` matching requests are waiting, then forward
  them all at once (two controllers racing for the Lease at the same instant).

For each request, one random draw picks at most one firing rule: a matching rule fires if the
draw falls in its `rate` (rates of matching rules add up, they do not compound), and a rule
with `count` fires at most that many times (per kind of call with `each_kind`). `injected`
lists every fault with the kind of call it hit, e.g. ("jobs", "create"); `writes` every write
request that reached the proxy, faulty or not, with the name of the object it sends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from kube_cluster import ControlPlane

ACTIONS = ("status", "hang", "drop", "drop_response", "cut", "expire_watch", "barrier")
# Not forwarded: they describe one hop's connection, or ask for an encoding relayed as is.
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host",
               "proxy-connection", "accept-encoding", "content-length"}
REASONS = {409: "Conflict", 410: "Expired", 429: "TooManyRequests", 500: "InternalError",
           503: "ServiceUnavailable", 504: "Timeout"}

Kind = tuple[str, str]  # (resource[/subresource], verb), as in an RBAC rule


def call_kind(method: str, path: str, query: dict[str, str]) -> Kind:
    """The (resource, verb) of a request path: /apis/batch/v1/namespaces/n/jobs/x → (jobs, get)."""
    parts = [p for p in path.split("/") if p]
    rest = parts[2:] if parts[:1] == ["api"] else parts[3:]  # drop api/v1 or apis/group/version
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = "/".join([rest[0], *rest[2:3]]) if rest else "discovery"
    named = len(rest) >= 2
    if method == "GET":
        verb = "watch" if query.get("watch") in ("true", "1") else "get" if named else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
    return resource, verb


@dataclass
class Rule:
    action: str
    methods: Iterable[str] | None = None  # None: any
    path: str = ""  # a regular expression searched in the path (no query)
    watch: bool | None = None  # True: watches only; False: no watches; None: both
    rate: float = 1.0
    count: int | None = None  # fire at most this many times (None: no limit)
    each_kind: bool = False  # count per kind of call instead of in all
    status: int = 503
    after: float = 1.0  # cut: relay this long first
    parties: int = 2  # barrier
    then: Callable[[], None] | None = None  # drop_response: run after the API server acted, before closing
    hits: int = 0
    _by_kind: dict[Kind, int] = field(default_factory=dict)
    _barrier: threading.Barrier | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; one of {', '.join(ACTIONS)}")
        self.methods = frozenset(m.upper() for m in self.methods) if self.methods is not None else None
        if self.action == "barrier":
            self._barrier = threading.Barrier(self.parties, timeout=30)

    def matches(self, method: str, path: str, kind: Kind) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.watch is not None and (kind[1] == "watch") != self.watch:
            return False
        if self.path and not re.search(self.path, path):
            return False
        used = self._by_kind.get(kind, 0) if self.each_kind else self.hits
        return self.count is None or used < self.count

    def fired(self, kind: Kind) -> None:
        self.hits += 1
        self._by_kind[kind] = self._by_kind.get(kind, 0) + 1


@dataclass(frozen=True)
class Injected:
    action: str
    kind: Kind
    method: str
    path: str
    status: int | None = None  # what the caller was answered (status), or the API server said
    name: str | None = None  # drop_response: the name of the object the API server answered with


class FaultyAPI:
    def __init__(self, cp: ControlPlane, *, seed: int | None = None, forward_timeout: float = 60.0):
        assert cp.server is not None and cp.ca_cert is not None
        upstream = urlsplit(cp.server)
        self.upstream = (upstream.hostname or "127.0.0.1", upstream.port or 443)
        self.client_tls = ssl.create_default_context(cafile=str(cp.ca_cert))
        self.server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_tls.load_cert_chain(*map(str, cp.serving_keypair))
        self.forward_timeout = forward_timeout
        self.random = random.Random(seed)
        self.rules: list[Rule] = []
        self.injected: list[Injected] = []
        self.writes: list[tuple[str, str, str | None]] = []  # (method, path, metadata.name in the body)
        self.requests = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._watches: set[socket.socket] = set()  # connections relaying a watch now
        self._httpd: ThreadingHTTPServer | None = None

    # -- rules ------------------------------------------------------------------------------

    def add(self, *rules: Rule) -> Rule:
        with self._lock:
            self.rules.extend(rules)
        return rules[-1]

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def _pick(self, method: str, path: str, kind: Kind) -> Rule | None:
        with self._lock:
            self.requests += 1
            draw = self.random.random()
            for rule in self.rules:
                if not rule.matches(method, path, kind):
                    continue
                if draw < rule.rate:
                    rule.fired(kind)
                    return rule
                draw -= rule.rate
        return None

    def _record(self, fault: Injected) -> None:
        with self._lock:
            self.injected.append(fault)

    def _observe(self, method: str, path: str, body: bytes | None) -> None:
        if method == "GET":
            return
        try:
            name = str(json.loads(body or b"")["metadata"]["name"])
        except (ValueError, KeyError, TypeError):
            name = None
        with self._lock:
            self.writes.append((method, path, name))

    def posted(self, path: str) -> list[str]:
        """The names of the objects POSTed to paths matching `path` (a regex), repeats included."""
        with self._lock:
            return [name or "" for method, p, name in self.writes if method == "POST" and re.search(path, p)]

    def faults(self, action: str | None = None) -> list[Injected]:
        with self._lock:
            return [f for f in self.injected if action is None or f.action == action]

    # -- serving ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"https://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> FaultyAPI:
        proxy = self

        class Handler(_Handler):
            api = proxy

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        # The TLS handshake happens in the connection's own thread, not in accept().
        httpd.socket = self.server_tls.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="faulty-api",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for rule in self.rules:
            if rule._barrier is not None:
                rule._barrier.abort()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # hanging requests and open watches
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FaultyAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def track(self, sock: socket.socket, open_: bool, *, watch: bool = False) -> None:
        with self._lock:
            tracked = self._watches if watch else self._sockets
            (tracked.add if open_ else tracked.discard)(sock)

    def cut_watches(self) -> int:
        """Cut every watch being relayed now, mid-stream; how many there were."""
        with self._lock:
            watches = list(self._watches)
        for sock in watches:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(watches)


def kubeconfig_via(api: FaultyAPI, kubeconfig: Path, path: Path) -> Path:
    """A copy of `kubeconfig` (credentials, CA) that reaches the API server through `api`."""
    config = json.loads(kubeconfig.read_text())
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = api.url
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class _Handler(BaseHTTPRequestHandler):
    api: FaultyAPI
    protocol_version = "HTTP/1.1"  # keep-alive, as the API server serves it
    upstream: http.client.HTTPSConnection | None = None

    def setup(self) -> None:
        super().setup()
        self.api.track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.api.track(self.connection, False)
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the test's output

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        split = urlsplit(self.path)
        query = dict(parse_qsl(split.query))
        kind = call_kind(self.command, split.path, query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.api._observe(self.command, split.path, body)
        rule = self.api._pick(self.command, split.path, kind)

        if rule is None or rule.action in ("cut", "drop_response", "expire_watch", "barrier"):
            target = self.path
            if rule is not None and rule.action == "expire_watch":
                target = split.path + "?" + urlencode({**query, "resourceVersion": "1"})
            if rule is not None and rule._barrier is not None:
                with contextlib.suppress(threading.BrokenBarrierError):
                    rule._barrier.wait()
            try:
                response = self._forward(target, body, watch=kind[1] == "watch")
            except (OSError, http.client.HTTPException) as e:
                self._send_status(502, f"proxy: the API server could not be reached: {e}")
                return
            if rule is None:
                self._relay(response, watch=kind[1] == "watch")
            elif rule.action == "drop_response":
                answer = response.read()
                try:
                    name = str(json.loads(answer)["metadata"]["name"])
                except (ValueError, KeyError, TypeError):
                    name = None
                self._fault(rule, kind, response.status, name=name)
                if rule.then is not None:
                    rule.then()
                self.close_connection = True
            elif rule.action == "cut":
                self._fault(rule, kind, response.status)
                self._relay(response, cut_after=rule.after, watch=kind[1] == "watch")
            elif rule.action == "expire_watch":
                self._fault(rule, kind, response.status)
                self._relay(response, watch=True, on_data=lambda data: self._note_expired(data, kind))
            else:
                self._fault(rule, kind, response.status)
                self._relay(response, watch=kind[1] == "watch")
        elif rule.action == "status":
            self._fault(rule, kind, rule.status)
            self._send_status(rule.status, f"injected fault: HTTP {rule.status}",
                              retry_after=1 if rule.status == 429 else None)
        elif rule.action == "hang":
            self._fault(rule, kind)
            self.api.stopping.wait(600)  # the caller gives up first; stop() ends it
            self.close_connection = True
        elif rule.action == "drop":
            self._fault(rule, kind)
            self.close_connection = True

    def _fault(self, rule: Rule, kind: Kind, status: int | None = None, name: str | None = None) -> None:
        self.api._record(Injected(rule.action, kind, self.command, urlsplit(self.path).path, status, name))

    def _note_expired(self, data: bytes, kind: Kind) -> None:
        """A watch the API server ended with a 410 ERROR event (rather than an HTTP 410)."""
        if b'"code":410' in data:
            self.api._record(Injected("expired_event", kind, "GET", urlsplit(self.path).path, 410))

    def _forward(self, target: str, body: bytes | None, *, watch: bool) -> http.client.HTTPResponse:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            if self.upstream is None:
                host, port = self.api.upstream
                self.upstream = http.client.HTTPSConnection(host, port, context=self.api.client_tls,
                                                            timeout=self.api.forward_timeout)
            try:
                self.upstream.request(self.command, target, body=body, headers=headers)
                response = self.upstream.getresponse()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                # The API server closed this idle keep-alive connection: a new one, once.
                self.upstream.close()
                self.upstream = None
                if attempt == 2:
                    raise
        if watch and self.upstream is not None and self.upstream.sock is not None:
            self.upstream.sock.settimeout(None)  # the server ends a watch (timeoutSeconds)
        return response

    def _relay(self, response: http.client.HTTPResponse, *, cut_after: float | None = None, watch: bool = False,
               on_data: Callable[[bytes], None] | None = None) -> None:
        """Send the API server's response on; with `cut_after`, cut the connection after that
        many seconds, mid-stream, without the last chunk."""
        length = response.getheader("Content-Length")
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in HOP_HEADERS:
                self.send_header(name, value)
        self.send_header("Transfer-Encoding", "chunked") if length is None else self.send_header(
            "Content-Length", length)
        self.end_headers()
        cut = threading.Event()
        timer = None
        if cut_after is not None:
            def cut_now() -> None:
                cut.set()
                for sock in (self.connection, self.upstream.sock if self.upstream else None):
                    with contextlib.suppress(OSError, AttributeError):
                        sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]

            timer = threading.Timer(cut_after, cut_now)
            timer.start()
        complete = False
        if watch:
            self.api.track(self.connection, True, watch=True)
        try:
            while not cut.is_set():
                data = response.read1(65536) if length is None else response.read()
                if on_data is not None and data:
                    on_data(data)
                if length is not None:
                    self.wfile.write(data)
                    complete = True
                    break
                if not data:
                    if not cut.is_set():
                        self.wfile.write(b"0\r\n\r\n")
                        complete = True
                    break
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
        except (OSError, http.client.HTTPException):
            pass
        finally:
            if timer is not None:
                timer.cancel()
            if watch:
                self.api.track(self.connection, False, watch=True)
        if not complete:
            self.close_connection = True
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None

    def _send_status(self, code: int, message: str, retry_after: int | None = None) -> None:
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                           "message": message, "reason": REASONS.get(code, ""), "code": code}).encode()
        self.send_response_only(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        self.end_headers()
        self.wfile.write(body)
