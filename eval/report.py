"""The comparison report: a terminal table, ``compare.json`` and ``compare.md``."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.common.io import atomic_write_bytes, atomic_write_json

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
TABLE_HEADER = ("metric", "SFT", "RL", "difference", "rel. change", "95% CI of difference")


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return f"{float(x):.{digits}g}"
    return "n/a"


def _pct(x: Any) -> str:
    if isinstance(x, numbers.Real) and math.isfinite(float(x)):
        return f"{100.0 * float(x):+.1f}%"
    return "n/a"


def _metric_name(row: Mapping[str, Any]) -> str:
    unit = row.get("unit") or ""
    name = str(row.get("metric", "?"))
    return f"{name} [{unit}]" if unit else name


def _ci_text(row: Mapping[str, Any]) -> str:
    text = f"[{_num(row.get('ci_low'))}, {_num(row.get('ci_high'))}]"
    if row.get("improved"):
        text += " better"
    elif row.get("worsened"):
        text += " worse"
    return text


def _cells(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, ...]]:
    return [
        (
            _metric_name(row),
            _num(row.get("sft")),
            _num(row.get("rl")),
            _num(row.get("difference")),
            _pct(row.get("relative_change")),
            _ci_text(row),
        )
        for row in rows
    ]


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width table of comparison rows for the terminal (difference = RL - SFT).

    "better"/"worse" after an interval marks a significant change (the interval excludes 0).
    """
    body = _cells(rows)
    widths = [max(len(TABLE_HEADER[c]), *(len(r[c]) for r in body)) for c in range(len(TABLE_HEADER))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:-1], widths[1:-1], strict=True)]
        return "  ".join([first, *rest, cells[-1].ljust(widths[-1])]).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(TABLE_HEADER), separator, *(line(r) for r in body)])


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "|".join([" --- "] + [" ---: "] * 5) + "|"]
    for cells in _cells(rows):
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _describe(row: Mapping[str, Any]) -> str:
    label = str(row.get("label") or row.get("metric"))
    unit = f" {row['unit']}" if row.get("unit") else ""
    return (
        f"{label} ({_num(row.get('sft'))} -> {_num(row.get('rl'))}{unit}, "
        f"95% CI of the change [{_num(row.get('ci_low'))}, {_num(row.get('ci_high'))}])"
    )


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def verdict(rows: Sequence[Mapping[str, Any]], num_episodes: int | None = None) -> str:
    """One paragraph in plain words: which metrics changed significantly, in which direction."""
    improved = [_describe(r) for r in rows if r.get("improved")]
    worsened = [_describe(r) for r in rows if r.get("worsened")]
    unchanged = [str(r.get("label") or r.get("metric")) for r in rows if not r.get("significant")]
    over = f"Over {num_episodes} paired scenarios, " if num_episodes else ""
    parts: list[str] = []
    if improved:
        parts.append(f"{over}RL significantly improved {_join(improved)}.")
    else:
        parts.append(f"{over}RL improved no metric significantly.")
    if worsened:
        parts.append(f"It was significantly worse on {_join(worsened)}.")
    if unchanged:
        parts.append(f"The differences in {_join(unchanged)} are within noise (their interval contains 0).")
    parts.append("Significant means the paired bootstrap interval of RL - SFT excludes 0.")
    return " ".join(parts)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data: numpy scalars and arrays to Python, non-finite floats to ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    sft_summary: Mapping[str, Any],
    rl_summary: Mapping[str, Any],
    per_episode_sft: Sequence[Mapping[str, Any]],
    per_episode_rl: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    plot_paths: Sequence[str | Path] | Mapping[str, str | Path] = (),
    animations: Mapping[str, str | Path] | None = None,
) -> tuple[Path, Path]:
    """Write ``compare.json`` and ``compare.md`` into ``out_dir`` (atomically); return their paths.

    ``compare.json``: ``{"sft": summary, "rl": summary, "rows": [...], "episodes": {"sft": [...],
    "rl": [...]}, "metadata": {...}, "plots": [relative paths], "animations": [relative paths]}``;
    non-finite numbers are ``null``. ``compare.md``: the table, a verdict paragraph, the plots (by
    relative path), links to the animations and the metadata. ``plot_paths`` is a list of paths or
    a mapping of caption to path; ``animations`` a mapping of caption to video path.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(plot_paths, Mapping):
        plots = [(str(caption), Path(p)) for caption, p in plot_paths.items()]
    else:
        plots = [(Path(p).stem.replace("_", " "), Path(p)) for p in plot_paths]
    relative = [(caption, Path(os.path.relpath(p, out_dir)).as_posix()) for caption, p in plots]
    videos = [
        (caption, Path(os.path.relpath(p, out_dir)).as_posix()) for caption, p in (animations or {}).items()
    ]

    json_path = out_dir / COMPARE_JSON
    atomic_write_json(
        json_path,
        to_jsonable(
            {
                "sft": dict(sft_summary),
                "rl": dict(rl_summary),
                "rows": list(rows),
                "episodes": {"sft": list(per_episode_sft), "rl": list(per_episode_rl)},
                "metadata": dict(metadata),
                "plots": [rel for _, rel in relative],
                "animations": [rel for _, rel in videos],
            }
        ),
    )

    num_episodes = min(len(per_episode_sft), len(per_episode_rl))
    lines = [
        "# SFT vs RL: paired closed-loop comparison",
        "",
        f"{num_episodes} scenarios, each driven by both policies. Difference = RL - SFT; "
        "the interval is a 95% paired bootstrap confidence interval of the mean difference.",
        "",
        _markdown_table(rows),
        "",
        "## Verdict",
        "",
        verdict(rows, num_episodes),
        "",
    ]
    if relative:
        lines += ["## Plots", ""]
        for caption, rel in relative:
            lines += [f"### {caption}", "", f"![{caption}]({rel})", ""]
    if videos:
        lines += ["## Animations", "", "The worst SFT scenarios, driven by SFT (left) and RL (right):", ""]
        lines += [f"- [{caption}]({rel})" for caption, rel in videos]
        lines.append("")
    if metadata:
        lines += ["## Run", "", "| setting | value |", "| --- | --- |"]
        for key, value in to_jsonable(dict(metadata)).items():
            text = str(value).replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {key} | `{text}` |")
        lines.append("")
    md_path = out_dir / COMPARE_MD
    atomic_write_bytes(md_path, "\n".join(lines).encode("utf-8"))
    return json_path, md_path
