"""Leader election over a coordination.k8s.io/v1 Lease: one active controller among its
replicas, the others standing by (the algorithm of client-go's leaderelection).

The holder renews the Lease every `retry_period`; a candidate takes it over once it has
seen the same holder and renewTime, unchanged, for `lease_duration` on its own clock (no
two machines' clocks are compared). Writes carry the Lease's resourceVersion, so of two
candidates racing for an expired Lease exactly one wins. A holder that cannot renew
within `renew_deadline` gives up leadership before its Lease can expire under it
(renew_deadline < lease_duration): the renew deadline counts from when the last successful
renewal was sent, and bounds every request made while renewing, so a hung API server cannot
keep a holder acting after its Lease may have passed to another. A write whose answer was
lost (a timeout, a dropped connection) is checked by reading the Lease back: if it holds this
candidate's own renewTime, the write landed. On shutdown the holder releases the Lease (empty
holder) so that a standby takes over at once instead of after lease_duration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from xstilts.operator.cluster.runtime.kube_api import LEASES, Kube, KubeError

log = logging.getLogger("xstilts.controller")

LEASE_NAME = "xstilts-controller"


@dataclass(frozen=True)
class LeaseRecord:
    holder: str | None
    duration_seconds: int
    renew_time: str | None
    transitions: int

    @classmethod
    def from_k8s(cls, lease: dict[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(holder=spec.get("holderIdentity") or None,
                   duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
                   renew_time=spec.get("renewTime"), transitions=int(spec.get("leaseTransitions") or 0))


def may_take(record: LeaseRecord | None, identity: str, observed_at: float, now: float) -> bool:
    """Whether `identity` may write itself as holder: the Lease does not exist, is free,
    is its own, or its record has not changed for its duration since `observed_at` (when
    this candidate first saw that record, on its own monotonic clock)."""
    if record is None or record.holder is None or record.holder == identity:
        return True
    return now >= observed_at + record.duration_seconds


def micro_time(moment: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(self, kube: Kube, namespace: str, identity: str, *, name: str = LEASE_NAME,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0, retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError(f"need retry period ({retry_period}s) < renew deadline ({renew_deadline}s)"
                             f" < lease duration ({lease_duration}s)")
        self.kube = kube
        self.namespace = namespace
        self.identity = identity
        self.name = name
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.leading = threading.Event()
        # One hung request must not use up the renew deadline: it leaves time for two more.
        self.attempt_timeout = renew_deadline / 3
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0

    def _deadline(self) -> float:
        """When requests of this attempt must give up (time.monotonic()): while leading, the
        renew deadline; while standing by, an attempt is not worth more than that either."""
        left = self.renew_deadline
        if self.leading.is_set():
            left -= self.clock() - self._last_renew
        return time.monotonic() + max(0.0, left)

    def try_acquire_or_renew(self) -> bool:
        """One attempt; True if this candidate holds the Lease afterwards."""
        sent = self.clock()
        now = datetime.now(UTC)
        deadline = self._deadline()
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name, deadline=deadline, timeout=self.attempt_timeout)
        except KubeError as e:
            if not e.not_found:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(now, acquired=True, transitions=0)}
            try:
                self.kube.create(body, deadline=deadline, timeout=self.attempt_timeout)
            except KubeError as e2:
                # Another candidate created it first, or this one did and never heard back.
                if e2.already_exists and self._landed(now, deadline):
                    return self._won(sent)
                if e2.already_exists:
                    return False
                raise
            return self._won(sent)
        record = LeaseRecord.from_k8s(lease)
        if record != self._observed:
            self._observed, self._observed_at = record, self.clock()
        if not may_take(record, self.identity, self._observed_at, self.clock()):
            return False
        ours = record.holder == self.identity
        lease["spec"] = {**(lease.get("spec") or {}),
                         **self._spec(now, acquired=not ours,
                                      transitions=record.transitions + (0 if ours else 1))}
        if ours:
            lease["spec"]["acquireTime"] = (lease.get("spec") or {}).get("acquireTime") or micro_time(now)
        try:
            self.kube.replace(lease, deadline=deadline, timeout=self.attempt_timeout)
        except KubeError as e:
            # Someone else wrote it since we read it, or an earlier attempt of this very
            # request landed and its answer was lost: the Lease tells which.
            if e.conflict and self._landed(now, deadline):
                return self._won(sent)
            if e.conflict:
                return False
            raise
        return self._won(sent)

    def _landed(self, now: datetime, deadline: float) -> bool:
        """Whether the Lease holds the record this candidate wrote at `now`."""
        lease = self.kube.get(LEASES, self.namespace, self.name, deadline=deadline, timeout=self.attempt_timeout)
        record = LeaseRecord.from_k8s(lease)
        self._observed, self._observed_at = record, self.clock()
        return record.holder == self.identity and record.renew_time == micro_time(now)

    def _spec(self, now: datetime, *, acquired: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {"holderIdentity": self.identity,
                                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                                "renewTime": micro_time(now), "leaseTransitions": transitions}
        if acquired:
            spec["acquireTime"] = micro_time(now)
        return spec

    def _won(self, sent: float) -> bool:
        # From when the request was sent: the API server may have stored it at once, and
        # standbys count the Lease's duration from when they see it.
        self._last_renew = sent
        if not self.leading.is_set():
            log.info("became leader: holding Lease %s/%s as %s", self.namespace, self.name, self.identity)
        self.leading.set()
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Block until this candidate leads (True) or `stop` is set (False)."""
        waiting_for: str | None = None
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    return True
                holder = self._observed.holder if self._observed else None
                if holder != waiting_for:
                    log.info("standing by: Lease %s/%s is held by %s", self.namespace, self.name, holder)
                    waiting_for = holder
            except KubeError as e:
                log.warning("leader election: %s", e)
            stop.wait(self.retry_period)
        return False

    def keep_renewing(self, stop: threading.Event, on_lost: Callable[[str], None]) -> threading.Thread:
        """Renew every retry_period from a thread; call `on_lost(reason)` once if the Lease
        was not renewed within renew_deadline or someone else took it."""

        def loop() -> None:
            while not stop.wait(self.retry_period):
                try:
                    if self.try_acquire_or_renew():
                        continue
                    reason = f"Lease taken over by {self._observed.holder if self._observed else 'someone else'}"
                except KubeError as e:
                    if self.clock() - self._last_renew < self.renew_deadline:
                        log.warning("renewing the Lease failed (%s); retrying", e)
                        continue
                    reason = f"could not renew the Lease for {self.renew_deadline:g}s: {e}"
                self.leading.clear()
                on_lost(reason)
                return

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the Lease up (if still held) so that a standby takes over at once."""
        if not self.leading.is_set():
            return
        self.leading.clear()
        deadline = time.monotonic() + self.renew_deadline
        try:
            lease = self.kube.get(LEASES, self.namespace, self.name, deadline=deadline, timeout=self.attempt_timeout)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**lease["spec"], "holderIdentity": None, "leaseDurationSeconds": 1,
                             "renewTime": micro_time(datetime.now(UTC))}
            self.kube.replace(lease, deadline=deadline, timeout=self.attempt_timeout)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except KubeError as e:
            log.warning("could not release the Lease (a standby takes over when it expires): %s", e)
