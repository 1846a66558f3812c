"""The report's plots as PNG bytes: gain vs model size (log x) per intermediate task and
target, with each arm's fitted trend and its 95% band, and a per-language gain heatmap per
target. matplotlib is imported here only, through
its object API with the Agg canvas: no pyplot state, no display needed."""

from __future__ import annotations

import io
import math
from typing import Any

from xstilts.operator.report.build import AVG, ZERO_SHOT, Figure, Report, fmt_parameters, headline

DPI = 110
DODGE_DECADES = 0.015


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def gain_vs_size(report: Report) -> Figure:
    g = report.grid
    targets = g.targets
    fig = _new_figure(4.6 * len(targets) + 1.0, 3.8)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    # A model's parameter count may be unknown (None); only the known ones have an x position.
    sizes = {m.name: n for m in report.models_by_size if (n := report.parameters.get(m.name))}
    sized = [m for m in report.models_by_size if m.name in sizes]
    unsized = [m.label for m in report.models_by_size if m.name not in sizes]
    for ax, target in zip(axes, targets, strict=True):
        language = headline(g, target)
        for i, arm in enumerate(g.arms):
            # Each arm's points sit slightly apart (in log space) so that error bars do not hide each other.
            dodge = 10 ** (DODGE_DECADES * (i - (len(g.arms) - 1) / 2))
            xs, ys, errs = [], [], []
            for m in sized:
                cell = report.cell(m.name, arm, target, language)
                if cell is not None:
                    xs.append(sizes[m.name] * dodge)
                    ys.append(cell.gain.mean)
                    errs.append(cell.gain.half_width or 0.0)
            trend = report.trends.get((arm, target))
            if xs:
                bars = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, linestyle="none",
                                   label=arm if trend is None else f"{arm}: {trend.slope:+.2f}/decade")
                if trend is not None:
                    colour = bars.lines[0].get_color()
                    band_x = [10 ** x for x, _, _ in trend.band]
                    ax.plot(band_x, [trend.at(x) for x, _, _ in trend.band], color=colour, linewidth=1.5)
                    ax.fill_between(band_x, [lo for _, lo, _ in trend.band], [hi for _, _, hi in trend.band],
                                    color=colour, alpha=0.15, linewidth=0)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        if sized:
            ticks = [sizes[m.name] for m in sized]
            ax.set_xticks(ticks, [f"{m.label}\n{fmt_parameters(sizes[m.name])}" for m in sized])
            ax.minorticks_off()
            lo, hi = min(ticks), max(ticks)
            ax.set_xlim(lo / 1.6, hi * 1.6)  # room for error bars at the ends, even with one model
        ax.set_title(f"{target}: {language} gain over baseline")
        ax.set_xlabel("model parameters (log scale)")
        ax.set_ylabel(f"gain in {g.metric(target)} (points)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="intermediate", fontsize="small")
    caption = ("Zero-shot gain from intermediate-task training vs model size; bars: 95% CI over seeds;"
               " line and band: the fitted trend and its 95% hierarchical-bootstrap interval.")
    if unsized:
        caption += f" Not plotted (parameter count unknown): {', '.join(unsized)}."
    return Figure("gain_vs_size.png", caption, _png(fig))


def gain_heatmap(report: Report, target: str) -> Figure:
    g = report.grid
    languages = [*g.languages[target], ZERO_SHOT, AVG]
    rows = [(m, arm) for m in report.models_by_size for arm in g.arms]
    matrix = [[(c.gain.mean if (c := report.cell(m.name, arm, target, lang)) else math.nan) for lang in languages]
              for m, arm in rows]
    finite = [abs(v) for row in matrix for v in row if not math.isnan(v)]
    bound = max(finite, default=1.0) or 1.0
    fig = _new_figure(max(4.5, 0.62 * len(languages) + 3.0), max(2.4, 0.42 * len(rows) + 1.4))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(languages)), languages)
    ax.set_yticks(range(len(rows)), [f"{m.label} · {arm}" for m, arm in rows])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            text = "–" if math.isnan(v) else f"{v:+.1f}"
            dark = not math.isnan(v) and abs(v) > 0.6 * bound
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.axvline(len(languages) - 2.5, color="black", linewidth=1.2)  # languages | their averages
    fig.colorbar(image, ax=ax, label="gain (points)")
    ax.set_title(f"{target}: gain over baseline by language")
    return Figure(f"gain_by_language_{target}.png",
                  f"{target}: mean gain per language over seeds (– : not computable yet).", _png(fig))


def figures(report: Report) -> list[Figure]:
    return [gain_vs_size(report), *(gain_heatmap(report, t) for t in report.grid.targets)]
