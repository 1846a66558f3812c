"""What `xstilts run` shows while it works: a rich live view on a terminal (counts, the
running runs' training progress, elapsed and remaining time), or plain timestamped lines when
stdout is not a terminal (CI logs), with a status line every so often."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# Plain mode repeats the status this often (seconds); events are printed as they happen.
PLAIN_STATUS_EVERY = 30.0


@dataclass(frozen=True)
class RunningRow:
    run_id: str
    title: str
    progress: dict[str, Any] | None  # the trainer's progress.json, when it has written one
    elapsed: float


@dataclass(frozen=True)
class ProgressView:
    experiment: str
    counts: dict[str, int]  # reconcile's status counts: total, pending, running, succeeded, failed, blocked
    earlier: int  # of the succeeded runs, those whose result existed before this invocation
    running: list[RunningRow]
    elapsed: float
    remaining: float | None
    note: str | None = None


class Display(Protocol):
    def __enter__(self) -> Display: ...
    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None: ...
    def event(self, text: str, style: str = "") -> None: ...
    def failure(self, run_id: str, title: str, reason: str, tail: list[str], log_path: Path) -> None: ...
    def update(self, view: ProgressView) -> None: ...


def format_seconds(seconds: float | None) -> str:
    """H:MM:SS or M:SS; '?' when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def counts_line(view: ProgressView) -> str:
    c = view.counts
    parts = [f"{c.get('succeeded', 0)}/{c.get('total', 0)} done"]
    if view.earlier:
        parts[0] += f" ({view.earlier} earlier)"
    parts += [f"{c.get('running', 0)} running", f"{c.get('pending', 0)} pending"]
    if c.get("failed"):
        parts.append(f"{c['failed']} failed")
    if c.get("blocked"):
        parts.append(f"{c['blocked']} blocked")
    to_do = c.get("pending", 0) + c.get("running", 0)
    left = f", ~{format_seconds(view.remaining)} left" if to_do else ""
    return f"{view.experiment}: " + ", ".join(parts) + f"; elapsed {format_seconds(view.elapsed)}{left}"


def progress_text(row: RunningRow) -> str:
    p = row.progress or {}
    step, total = p.get("step"), p.get("total_steps")
    bits = [str(p.get("phase") or "starting")]
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        bits.append(f"step {step}/{total}")
    if isinstance(p.get("loss"), int | float):
        bits.append(f"loss {p['loss']:.3f}")
    if isinstance(p.get("eta_s"), int | float):
        bits.append(f"~{format_seconds(p['eta_s'])} left")
    return ", ".join(bits)


class PlainDisplay:
    """Line by line, for logs: every event, and the status every PLAIN_STATUS_EVERY seconds."""

    def __init__(self, console: Console, status_every: float = PLAIN_STATUS_EVERY):
        self.console = console
        self.status_every = status_every
        self.last_status = 0.0

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def _line(self, text: str) -> None:
        self.console.print(f"[{time.strftime('%H:%M:%S')}] {text}", markup=False, highlight=False,
                           soft_wrap=True)

    def event(self, text: str, style: str = "") -> None:
        self._line(text)

    def failure(self, run_id: str, title: str, reason: str, tail: list[str], log_path: Path) -> None:
        self._line(f"FAILED {run_id} {title}: {reason}; log: {log_path}")
        for line in tail:
            self.console.print(f"    | {line}", markup=False, highlight=False, soft_wrap=True)

    def update(self, view: ProgressView) -> None:
        now = time.monotonic()
        if now - self.last_status < self.status_every:
            return
        self.last_status = now
        self._line(counts_line(view))
        for row in view.running:
            self._line(f"  {row.run_id} {row.title}: {progress_text(row)} ({format_seconds(row.elapsed)})")


class LiveDisplay:
    """A live panel redrawn by the executor's loop (no refresh thread: the executor starts
    processes with a pre-exec hook, which must not run while other threads hold locks)."""

    def __init__(self, console: Console):
        self.console = console
        self.live = Live(Text(""), console=console, auto_refresh=False, transient=False)

    def __enter__(self) -> LiveDisplay:
        self.live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.__exit__(kind, value, tb)

    def event(self, text: str, style: str = "") -> None:
        line = Text(f"{time.strftime('%H:%M:%S')} ") + Text(text, style=style)
        self.live.console.print(line, soft_wrap=True)
        self.live.refresh()

    def failure(self, run_id: str, title: str, reason: str, tail: list[str], log_path: Path) -> None:
        self.event(f"FAILED {run_id} {title}: {reason}; log: {log_path}", style="bold red")
        for line in tail:
            self.live.console.print(Text(f"    | {line}", style="dim"), soft_wrap=True)

    def update(self, view: ProgressView) -> None:
        self.live.update(render(view), refresh=True)


def render(view: ProgressView) -> RenderableType:
    total = max(view.counts.get("total", 0), 1)
    done = view.counts.get("succeeded", 0)
    header = Table.grid(padding=(0, 1))
    header.add_row(ProgressBar(total=total, completed=done, width=30), Text(counts_line(view)))
    parts: list[RenderableType] = [header]
    if view.running:
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        for column in ("run", "", "progress", "", "elapsed"):
            table.add_column(column, no_wrap=True, overflow="ellipsis")  # one line per run: no jumping
        for row in view.running:
            p = row.progress or {}
            step, steps = p.get("step"), p.get("total_steps")
            bar: RenderableType = Text("")
            if isinstance(step, int) and isinstance(steps, int) and steps > 0:
                bar = ProgressBar(total=steps, completed=min(step, steps), width=20)
            table.add_row(row.run_id, escape(row.title), bar, progress_text(row), format_seconds(row.elapsed))
        parts.append(table)
    if view.note:
        parts.append(Text(view.note, style="yellow"))
    return Group(*parts)


def display_for(console: Console) -> Display:
    return LiveDisplay(console) if console.is_terminal else PlainDisplay(console)


def print_outcome(console: Console, outcome: Any, report_command: str, ui_command: str) -> None:
    """The closing summary of `xstilts run` (outcome: local.Outcome)."""
    c = outcome.counts
    succeeded = c.get("succeeded", 0)
    console.print(
        f"[bold]{succeeded}/{c.get('total', 0)}[/bold] runs done ({succeeded - outcome.earlier} now,"
        f" {outcome.earlier} earlier) in {format_seconds(outcome.elapsed_seconds)};"
        f" {len(outcome.failed)} failed, {len(outcome.blocked)} blocked, {c.get('pending', 0)} not started")
    for f in outcome.failed:
        why = f.reason + (" in an earlier invocation; --retry-failed retries it" if f.earlier else "")
        console.print(f"[red]failed[/red] {f.run_id} {escape(f.title)}: {escape(why)}; log: {escape(str(f.log_path))}",
                      soft_wrap=True)
    if outcome.blocked:
        console.print("[red]blocked[/red] (a run they need failed): "
                      + ", ".join(f"{run_id} {escape(title)}" for run_id, title, _ in outcome.blocked),
                      soft_wrap=True)
    if outcome.stopped_by is not None:
        console.print("[yellow]stopped[/yellow]: run the same command again to resume where it left off")
    console.print(f"report: [bold]{escape(report_command)}[/bold]    MLflow: [bold]{escape(ui_command)}[/bold]",
                  soft_wrap=True)
