"""Which PyTorch LCS needs, checked on the installed one's version before torch is imported: an old torch may fail
to import (or import and fail later) with a message that does not say the version is the cause. No torch import here,
so the Slicer panel can call it before PyTorch loads."""
from __future__ import annotations

import re
from importlib import metadata

MINIMUM = (2, 4)  # pyproject.toml: torch>=2.4 (no wheel of it for Intel macOS: PyTorch's last there is 2.2.2)


def torch_version_problem(version: str) -> str:
    """"" when `version` (as "2.2.2" or "2.6.0+cu124") is new enough for LCS, else one line saying what to do."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match and tuple(int(n) for n in match.groups()) >= MINIMUM:
        return ""
    needed = ".".join(map(str, MINIMUM))
    return (f"PyTorch {version} is installed, but LCS needs PyTorch {needed} or newer: update it with the PyTorch "
            "Utils module (Uninstall, restart Slicer, Install), then restart Slicer. On an Intel Mac there is none "
            "newer than 2.2.2: run LCS on Apple silicon, Linux or Windows.")


def installed_torch_problem() -> str:
    """torch_version_problem of the installed torch ("" when none is installed: the caller offers to install it)."""
    try:
        return torch_version_problem(metadata.version("torch"))
    except metadata.PackageNotFoundError:
        return ""
