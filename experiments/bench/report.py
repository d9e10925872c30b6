"""What the benchmark scripts share: the commit and date they record, and rewriting their own `## ` section
of docs/benchmarks.md while keeping every other section."""

from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path


def git_rev() -> str:
    """`git rev-parse --short HEAD`, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_section(path: Path, title: str, body: str) -> None:
    """Replaces the section of `path` headed by `title` (a `## ` line), or appends it; other sections are kept."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    parts = re.split(r"(?m)^(?=## )", text)  # parts[0] is the title / preamble
    section = f"{title}\n\n{body}\n"
    for i, p in enumerate(parts):
        if p.startswith(title):
            parts[i] = section + ("\n" if i < len(parts) - 1 else "")
            break
    else:
        parts.append(section)
        if not parts[-2].endswith("\n\n"):
            parts[-2] = parts[-2].rstrip("\n") + "\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts))
