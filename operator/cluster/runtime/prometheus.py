"""The controller's health endpoints and Prometheus metrics, with the standard library only
(the controller image carries no extra server).

`Metrics` holds counters, gauges and histograms and renders them in the Prometheus text
exposition format (version 0.0.4); `serve_http` answers /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("xstilts.controller")

# Reconciling an experiment takes milliseconds to seconds (10,000 runs).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Mapping[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    pairs = [*labels, *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


class Metrics:
    """A small thread-safe registry. Names are declared once with help text and type."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[Labels, float]] = {}
        self._histograms: dict[str, dict[Labels, list[float]]] = {}  # bucket counts + sum + count
        self._collectors: list[Callable[[Metrics], None]] = []

    def declare(self, name: str, kind: str, help_text: str) -> None:
        with self._lock:
            self._meta[name] = (kind, help_text)
            if kind == "histogram":
                self._histograms.setdefault(name, {})
            else:
                self._values.setdefault(name, {})

    def inc(self, name: str, labels: Mapping[str, str] | None = None, amount: float = 1.0) -> None:
        with self._lock:
            series = self._values[name]
            key = _labels(labels)
            series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = value

    def clear(self, name: str) -> None:
        """Drop every series of a gauge (before setting the current ones)."""
        with self._lock:
            self._values[name].clear()

    def observe(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            series = self._histograms[name]
            key = _labels(labels)
            cells = series.setdefault(key, [0.0] * (len(DURATION_BUCKETS) + 2))
            for i, bound in enumerate(DURATION_BUCKETS):
                if value <= bound:
                    cells[i] += 1
            cells[-2] += value
            cells[-1] += 1

    def value(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        with self._lock:
            return self._values.get(name, {}).get(_labels(labels), 0.0)

    def on_collect(self, collector: Callable[[Metrics], None]) -> None:
        """Run `collector` before each rendering (for gauges read from elsewhere)."""
        self._collectors.append(collector)

    def render(self) -> str:
        for collector in self._collectors:
            collector(self)
        lines: list[str] = []
        with self._lock:
            for name, (kind, help_text) in sorted(self._meta.items()):
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    for labels, cells in sorted(self._histograms[name].items()):
                        for i, bound in enumerate(DURATION_BUCKETS):
                            lines.append(f"{name}_bucket{_format_labels(labels, [('le', _number(bound))])}"
                                         f" {_number(cells[i])}")
                        lines.append(f"{name}_bucket{_format_labels(labels, [('le', '+Inf')])} {_number(cells[-1])}")
                        lines.append(f"{name}_sum{_format_labels(labels)} {_number(cells[-2])}")
                        lines.append(f"{name}_count{_format_labels(labels)} {_number(cells[-1])}")
                else:
                    for labels, value in sorted(self._values[name].items()):
                        lines.append(f"{name}{_format_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[str, float]:
    """`name{labels}` → value, for tests and `xstilts status`-like tools reading /metrics."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        samples[series] = float(value)
    return samples


class Health:
    """What /healthz and /readyz report: alive unless a part of the controller died;
    ready once connected to the API (caches synced, or waiting as a standby)."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.problem: str | None = None

    def alive(self) -> tuple[bool, str]:
        return (self.problem is None, self.problem or "ok")

    def readiness(self) -> tuple[bool, str]:
        if self.problem:
            return False, self.problem
        return (True, "ok") if self.ready.is_set() else (False, "not connected to the API yet")


def serve_http(port: int, health: Health, metrics: Metrics, *, host: str = "0.0.0.0",
               paths: Iterable[str] = ("/healthz", "/readyz", "/metrics")) -> ThreadingHTTPServer:
    """Serve the given paths on `port` from a daemon thread; returns the server (shutdown()
    stops it). Port 0 picks a free port (server.server_address says which)."""
    served = frozenset(paths)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in served:
                self._reply(404, "not found\n")
            elif path == "/metrics":
                self._reply(200, metrics.render(), CONTENT_TYPE)
            else:
                ok, message = health.alive() if path == "/healthz" else health.readiness()
                self._reply(200 if ok else 503, message + "\n")

        def _reply(self, code: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # probes every few seconds: no access log
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name=f"http-{port}", daemon=True)
    thread.start()
    return server
