"""Chapter outputs meant for people: markdown tables and the results.md file."""
from __future__ import annotations

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
