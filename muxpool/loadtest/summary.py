"""A comparison's outputs: JSON, a PNG chart, and a recommendation in words."""

from __future__ import annotations

import statistics

import json
import pathlib
import platform
import os
import time

from .compare import Row


def machine() -> str:
    return (f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"{platform.python_implementation()} {platform.python_version()}")


def write_json(rows: list[Row], path: pathlib.Path, meta: dict) -> None:
    data = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **meta,
            "servers": [row.as_dict() for row in rows]}
    path.write_text(json.dumps(data, indent=2))


def write_chart(rows: list[Row], path: pathlib.Path, title: str) -> bool:
    """Requests/s (median, min–max whiskers) and p99 for each server. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.reports]
    names = [r.server.replace("muxpool:", "muxpool\n") for r in ok]
    medians = [r.median_rps() for r in ok]
    low = [m - min(r.rps) for m, r in zip(medians, ok)]
    high = [max(r.rps) - m for m, r in zip(medians, ok)]
    colors = ["#2b7bba" if r.server.startswith("muxpool:") else "#999999" for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.bar(names, medians, yerr=[low, high], color=colors, capsize=4)
    ax1.set_title("requests/s (median, min–max)")
    ax2.bar(names, [r.median_p99() for r in ok], color=colors)
    ax2.set_title("p99 latency, ms (median)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def recommend(rows: list[Row], workload: str) -> str:
    """Which muxpool engine to pick for this workload, from the figures, and how sure that is."""
    ours = [r for r in rows if r.server.startswith("muxpool:") and r.reports and not r.errors
            and not r.warmup_errors]
    if not ours:
        return "No muxpool engine completed without errors: no recommendation."
    best = max(ours, key=Row.median_rps)
    text = (f"For this workload ({workload}), use --engine {_engine(best)}: "
            f"{best.median_rps():,.0f} requests/s")
    others = sorted((r for r in ours if r is not best), key=Row.median_rps, reverse=True)
    if others:
        text += ", " + ", ".join(f"{best.median_rps() / max(1.0, r.median_rps()):.2f}x "
                                 f"{_engine(r)}" for r in others)
    refs = [r for r in rows if not r.server.startswith("muxpool:") and r.reports]
    ref = max(refs, key=Row.median_rps) if refs else None
    if ref is not None:
        text += f"; the fastest reference server, {ref.server}, does {ref.median_rps():,.0f}"
    notes = [_sureness(best, others[0] if others else None),
             _pinning([best, *others] + ([ref] if ref else []))]
    return " ".join([text + "."] + [note for note in notes if note])


def _engine(row: Row) -> str:
    return row.server.split(":", 1)[1]


def _sureness(best: Row, runner_up: Row | None) -> str:
    """How far the lead stands out from the noise between rounds."""
    runs = len(best.rps)
    if runs < 2:
        return ("Warning: measured once (--repeat 1), so there is no spread to tell a lead from "
                "noise; run --repeat 3 or more before trusting this.")
    if runner_up is None:
        return ""
    low, high = min(best.rps), max(runner_up.rps)
    spans = (f"{_engine(best)} {min(best.rps):,.0f}–{max(best.rps):,.0f}, "
             f"{_engine(runner_up)} {min(runner_up.rps):,.0f}–{high:,.0f}")
    if low <= high:
        return (f"Not a clear lead: over {runs} rounds the runs overlap ({spans}), so "
                f"{_engine(best)} and {_engine(runner_up)} are within noise here.")
    return (f"A clear lead: {_engine(best)}'s slowest of {runs} runs beat {_engine(runner_up)}'s "
            f"fastest ({spans}).")


def _pinning(compared: list[Row]) -> str:
    unpinned = [r.server for r in compared if r.pinned == "not pinned"]
    if not unpinned or len(unpinned) == len(compared):
        return ""
    return (f"Note: {', '.join(unpinned)} ran unpinned, on every core and sharing them with the "
            "generator, while the others had one core each: requests/s does not compare them like "
            "for like (requests per server CPU-second does).")


def markdown_table(rows: list[Row], anchor: str | None = None) -> str:
    """The comparison as a markdown table, with whether the generator was saturated
    in each row's runs. ``anchor`` adds a ratio column against that server: of
    requests/s, or of requests per server CPU-second where either row's
    generator was saturated (its requests/s then say how fast the generator
    went, not the server); round by round, with the spread (see versus)."""
    base = next((r for r in rows if r.server == anchor and r.reports), None)
    head = ("| server | requests/s (median) | spread (min–max) | p99 ms | requests per server CPU-s "
            "| generator saturated | errors |")
    rule = "|---|---:|---:|---:|---:|---|---:|"
    if base:
        head += f" vs {anchor} |"
        rule += "---:|"
    lines = [head, rule]
    for row in rows:
        if not row.reports:
            lines.append(f"| {row.server} | failed: {row.failure[:80]} | | | | | |" + (" |" if base else ""))
            continue
        cpu = row.median_per_cpu_second()
        line = (f"| {row.server} | {row.median_rps():,.0f} | {min(row.rps):,.0f}–{max(row.rps):,.0f} | "
                f"{row.median_p99():.2f} | {f'{cpu:,.0f}' if cpu else '–'} | {saturation(row)} | "
                f"{row.errors} |")
        if base:
            line += f" {versus(row, base)} |"
        lines.append(line)
    return "\n".join(lines)


def saturation(row: Row) -> str:
    """``no``, or how many of the row's runs had the generator at its limit: busy
    on its core, or waiting for it behind other processes (a shared machine)."""
    runs = sum(r.generator_bound for r in row.reports)
    if not runs:
        return "no"
    starved = "" if any(r.saturated for r in row.reports) else " (starved: other processes had its core)"
    return ("yes" if runs == len(row.reports) else f"{runs} of {len(row.reports)} runs") + starved


def versus(row: Row, base: Row, paired: bool = True) -> str:
    """``row`` against ``base``: requests/s, or requests per server CPU-second
    (so marked) when a saturated generator capped either.

    ``paired``: the rows' runs were interleaved, run *i* of each in the same
    round, so the ratio is the median of the per-round ratios, with their
    spread: a slow spell of the machine falls on both sides of a ratio
    instead of on one median. Otherwise, the ratio of the medians."""
    capped = any(r.generator_bound for r in row.reports + base.reports)
    per_cpu = capped and row.median_per_cpu_second() and base.median_per_cpu_second()
    mine, theirs = (row.per_cpu_second, base.per_cpu_second) if per_cpu else (row.rps, base.rps)
    unit = " per CPU-s" if per_cpu else ""
    if paired and 1 < len(mine) == len(theirs) and all(theirs):
        ratios = sorted(a / b for a, b in zip(mine, theirs))
        return f"{statistics.median(ratios):.2f}x{unit} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
    if not theirs or not statistics.median(theirs):
        return "–"
    return f"{statistics.median(mine) / statistics.median(theirs):.2f}x{unit}"
