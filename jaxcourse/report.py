"""Chapter outputs meant for people: markdown tables, results.md, the stage a run is in and
the results table every chapter run ends with."""
from __future__ import annotations

import contextlib
import contextvars
import pathlib


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """One markdown table: a column per key in `columns`, blank where a row lacks the key."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(workdir: pathlib.Path, title: str, sections: list[tuple[str, str]]) -> str:
    """Writes workdir/results.md (a title, then one `## heading` per section), prints it."""
    text = f"# {title}\n\n" + "\n".join(f"## {h}\n\n{body}\n" for h, body in sections)
    (workdir / "results.md").write_text(text)
    print(text, flush=True)
    return text


# ---------------------------------------------------------------------------------------
# What the terminal shows: the stage a run is in, and the results table at its end.

_STAGE: contextvars.ContextVar = contextvars.ContextVar("jaxcourse_stage", default="")


@contextlib.contextmanager
def stage(label: str):
    """Announces a part of a run ("lab optimizers", "optimizer adam lr=0.003"); the training
    loop's progress lines carry the innermost labels while it is open."""
    outer = _STAGE.get()
    token = _STAGE.set(f"{outer} / {label}" if outer else label)
    print(f"--- {_STAGE.get()}", flush=True)
    try:
        yield
    finally:
        _STAGE.reset(token)


def current_stage() -> str:
    """The labels of the open stages, outermost first ("" outside any)."""
    return _STAGE.get()


def _shown(key: str, value) -> bool:
    if isinstance(value, str):
        return len(value) <= 40 and "\n" not in value
    return isinstance(value, (bool, int, float)) and not key.startswith("seconds_")


def _text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _breadth_first(items: list[tuple[str, object]], n: int) -> list[tuple[str, object]]:
    """The first n items, taken in turns from each name family (`engine_*`, `modes_*`, ...)
    when there are more than n, so that every lab of a many-lab run shows its first numbers."""
    if len(items) <= n:
        return items
    families: dict[str, list] = {}
    for item in items:
        families.setdefault(item[0].split("_")[0], []).append(item)
    picked: set[str] = set()
    for depth in range(max(len(f) for f in families.values())):
        for family in families.values():
            if depth < len(family) and len(picked) < n:
                picked.add(family[depth][0])
    return [item for item in items if item[0] in picked]


def results_table(metrics: dict, max_rows: int = 16, max_cols: int = 6) -> tuple[list[str], int]:
    """Terminal lines for a summary's metrics, and how many values they leave out.

    Keys `group/name` shared by several groups (layouts, variants, methods) become one
    table, a row per group and a column per name; other scalars are `name  value` lines.
    Lists and long strings stay in summary.json."""
    shown = {k: v for k, v in metrics.items() if _shown(k, v)}
    groups: dict[str, dict] = {}
    for key, value in shown.items():
        prefix, sep, name = key.rpartition("/")
        if sep:
            groups.setdefault(prefix, {})[name] = value
    clusters: list[dict[str, dict]] = []  # groups that share at least half their names
    for group, vals in groups.items():
        for cluster in clusters:
            names = {n for v in cluster.values() for n in v}
            if 2 * len(names & set(vals)) >= len(vals):
                cluster[group] = vals
                break
        else:
            clusters.append({group: vals})
    clusters = [c for c in clusters if len(c) > 1]
    grouped = {f"{g}/{n}" for c in clusters for g, vals in c.items() for n in vals}
    lines, used = [], 0
    flat = _breadth_first([(k, v) for k, v in shown.items() if k not in grouped], max_rows)
    if flat:
        lines += _text_table([[k, _fmt(v)] for k, v in flat])
        used += len(flat)
    for cluster in clusters:
        names = list(dict.fromkeys(n for vals in cluster.values() for n in vals))[:max_cols]
        rows = list(cluster.items())[:max_rows]
        table = [["", *names]] + [[g, *(_fmt(vals[n]) if n in vals else "-" for n in names)]
                                  for g, vals in rows]
        lines += _text_table(table)
        used += sum(1 for _, vals in rows for n in names if n in vals)
    return lines, len(metrics) - used


def results_summary(summary: dict, workdir: pathlib.Path, figures: list[pathlib.Path]) -> str:
    """The end of every chapter run: its headline numbers and where its files are."""
    name = f"{summary['chapter']} {summary['experiment']}:{summary['preset']}"
    lines, left_out = results_table(summary["metrics"])
    out = [f"=== results of {name} ({summary['wall_seconds']:.1f} s) ===", *lines]
    if left_out:
        out.append(f"  ({left_out} more values in {workdir}/summary.json)")
    if figures:
        rel = sorted(str(p.relative_to(workdir)) if p.is_relative_to(workdir) else str(p)
                     for p in dict.fromkeys(figures))
        out.append(f"figures in {workdir}/: {', '.join(rel)}")
    if (workdir / "results.md").exists():
        out.append(f"tables: {workdir}/results.md")
    return "\n".join(out)
