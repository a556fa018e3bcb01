"""Turns the per-run rows of a comparison into medians, ratios, a CSV and a bar chart."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

RINGFEED = "ringfeed"
FLOOR = "decode floor"
STAGES = "ringfeed bench stages"


@dataclass(frozen=True)
class Row:
    """One run of one system in one mode (``floor`` rows carry only ``images_per_s``)."""

    mode: str
    rep: int
    system: str
    images: int
    seconds: float
    images_per_s: float
    wait_share: float
    startup_s: float
    cpu_ms_per_image: float


@dataclass(frozen=True)
class Summary:
    """Medians over the repetitions of one system in one mode."""

    mode: str
    system: str
    runs: int
    images_per_s: float
    low: float
    high: float
    wait_share: float
    cpu_ms_per_image: float


def summarise(rows: Iterable[Row]) -> list[Summary]:
    """Medians (and min/max of the rate) per (mode, system), in first-seen order."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.mode, row.system), []).append(row)
    return [
        Summary(
            mode=mode,
            system=system,
            runs=len(group),
            images_per_s=statistics.median(r.images_per_s for r in group),
            low=min(r.images_per_s for r in group),
            high=max(r.images_per_s for r in group),
            wait_share=statistics.median(r.wait_share for r in group),
            cpu_ms_per_image=statistics.median(r.cpu_ms_per_image for r in group),
        )
        for (mode, system), group in groups.items()
    ]


def ratio_lines(summaries: Sequence[Summary], mode: str) -> list[str]:
    """``ringfeed / peer`` for every peer of ``mode`` (the floor as a share of it)."""
    group = {s.system: s for s in summaries if s.mode == mode}
    ours = group.get(RINGFEED)
    if ours is None or ours.images_per_s <= 0:
        return []
    lines = []
    for system, peer in group.items():
        if system == RINGFEED or peer.images_per_s <= 0:
            continue
        ratio = ours.images_per_s / peer.images_per_s
        if system == FLOOR:
            by_cpu = peer.cpu_ms_per_image / ours.cpu_ms_per_image if ours.cpu_ms_per_image else 0
            lines.append(
                f"ringfeed / {system}: {ratio * 100:.0f} % by wall time "
                f"({by_cpu * 100:.0f} % by CPU time per image)"
            )
        elif ours.cpu_ms_per_image > 0:
            cpu = peer.cpu_ms_per_image / ours.cpu_ms_per_image
            lines.append(f"ringfeed / {system}: {ratio:.2f}× (it spends {cpu:.2f}× the CPU)")
        else:
            lines.append(f"ringfeed / {system}: {ratio:.2f}×")
    return lines


def table(summaries: Sequence[Summary]) -> str:
    """A Markdown table of the medians, one line per (mode, system)."""
    lines = [
        "| mode | system | runs | images/s (median) | min – max | CPU ms / image "
        "| trainer waited |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        wait = "" if s.mode in ("throughput", STAGES) else f"{s.wait_share * 100:.0f} %"
        cpu = f"{s.cpu_ms_per_image:.2f}" if s.cpu_ms_per_image else ""
        lines.append(
            f"| {s.mode} | {s.system} | {s.runs} | {s.images_per_s:,.0f} "
            f"| {s.low:,.0f} – {s.high:,.0f} | {cpu} | {wait} |"
        )
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Every run, one line each, in the order they ran."""
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(row).items()}
            )


def read_csv(path: Path) -> list[Row]:
    """The rows :func:`write_csv` wrote."""
    kinds = {f.name: f.type for f in fields(Row)}
    with path.open(newline="") as source:
        return [
            Row(**{k: _parse(kinds[k], v) for k, v in line.items()})
            for line in csv.DictReader(source)
        ]


def _parse(kind: Any, text: str) -> Any:
    if kind in ("int", int):
        return int(text)
    if kind in ("float", float):
        return float(text)
    return text


def chart(summaries: Sequence[Summary], title: str, path: Path) -> None:
    """Bar charts: images/s and CPU time per image per system (throughput mode, the floor
    hatched) and, when the trainer mode ran, the share of wall time the trainer waited."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(s.mode for s in summaries if s.mode != STAGES))
    panels = [(m, kind) for m in modes if m == "throughput" for kind in ("rate", "cpu")]
    panels += [(m, "wait") for m in modes if m != "throughput"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (mode, kind) in zip(axes[0], panels):
        group = [s for s in summaries if s.mode == mode]
        names = [s.system for s in group]
        colours = [
            "tab:orange" if n == RINGFEED else "tab:gray" if n == FLOOR else "tab:blue"
            for n in names
        ]
        if kind == "rate":
            values = [s.images_per_s for s in group]
            errors = [
                [v - s.low for v, s in zip(values, group)],
                [s.high - v for v, s in zip(values, group)],
            ]
            bars = ax.bar(names, values, color=colours, yerr=errors, capsize=3)
            ax.set_title("throughput (wall clock)", fontsize=10)
            ax.set_ylabel("images/s (median, min–max)")
            ax.set_ylim(0, max(s.high for s in group) * 1.12)
            labels = [f"{v:,.0f}" for v in values]
        elif kind == "cpu":
            values = [s.cpu_ms_per_image for s in group]
            bars = ax.bar(names, values, color=colours)
            ax.set_title("CPU time per image (whatever the load)", fontsize=10)
            ax.set_ylabel("CPU ms per image (lower is better)")
            ax.set_ylim(0, max(values) * 1.12)
            labels = [f"{v:.2f}" for v in values]
        else:
            values = [s.wait_share * 100 for s in group]
            bars = ax.bar(names, values, color=colours)
            ax.set_title(mode, fontsize=10)
            ax.set_ylabel("% of wall time the trainer waited for data")
            ax.set_ylim(0, 110)
            labels = [f"{v:.0f} %" for v in values]
        for bar, name in zip(bars, names):
            if name == FLOOR:
                bar.set_hatch("//")
                bar.set_facecolor("white")
                bar.set_edgecolor("tab:gray")
        ax.bar_label(bars, labels=labels, padding=2, fontsize=8)
        ax.tick_params(axis="x", labelrotation=25, labelsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
