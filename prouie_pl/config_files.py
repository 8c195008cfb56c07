"""The YAML configs that ship with the package, found by name from any working folder.

The repository keeps them in ``configs/`` (one folder per model, one file per stage x device); a wheel
installs the same tree as ``prouie_pl/configs/``.  A ``--config`` value that is not an existing file is looked
up there: ``tiny/pipeline.yaml`` and ``configs/tiny/pipeline.yaml`` both name the embedded tiny pipeline, so
the README's commands work from a checkout and from an installed package alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_PACKAGE = Path(__file__).resolve().parent


def embedded_config_dir() -> Optional[Path]:
    """The folder holding the shipped configs: inside the installed package, else the checkout's ``configs/``."""
    for folder in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if folder.is_dir():
            return folder
    return None


def embedded_configs() -> list[str]:
    """Names of the shipped configs (``tiny/cm.yaml``, ...)."""
    root = embedded_config_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root else []


def resolve_config(path: str) -> str:
    """``path`` itself if it is a file, else the shipped config of that name; unchanged when neither exists."""
    p = Path(path).expanduser()
    if p.is_file():
        return str(p)
    root = embedded_config_dir()
    if root is None:
        return path
    name = Path(*p.parts[1:]) if p.parts and p.parts[0] == "configs" else p
    candidate = root / name
    return str(candidate) if candidate.is_file() else path
