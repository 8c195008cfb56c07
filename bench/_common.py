"""Helpers shared by the benchmark scripts: where the real data is, machine facts, writing tables."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DATA = Path(os.environ.get("PROUIE_SHARED_DATA", REPO.parent / "shared" / "data" / "uie"))


def require_shared_data() -> Path:
    if not (SHARED_DATA / "NER").is_dir():
        sys.exit(f"this benchmark needs the real data at {SHARED_DATA} (set PROUIE_SHARED_DATA)")
    return SHARED_DATA


def machine_line() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return f"{dev}; Python {platform.python_version()}; torch {torch.__version__}; {platform.machine()}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:,.2f}" if abs(x) < 1e6 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, title: str, body: str, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"# {title}\n\n{machine_line()}\n\n{body}\n"
    path.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {path}")
    return path
