"""What made a result: the kdcl version and, when kdcl runs from a git checkout, its commit.

Recorded in every checkpoint (``provenance``) and in ``summary.csv`` (``kdcl_version``,
``git_commit``), so that a number can be traced to the code that produced it.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent  # the checkout's root when kdcl is not installed as a wheel


@functools.cache
def provenance() -> dict[str, str | None]:
    """``{"kdcl_version": the installed version, "git_commit": the source checkout's commit,
    with ``+dirty`` when tracked files differ from it, or None outside a checkout}``."""
    return {"kdcl_version": metadata.version("kdcl"), "git_commit": git_commit(SOURCE)}


def git_commit(folder: Path) -> str | None:
    """The commit checked out in ``folder`` (``+dirty``: with changes to tracked files), or
    None when it is not a git checkout or git is not there."""
    if not (folder / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        clean = subprocess.run(["git", "-C", str(folder), "diff", "--quiet", "HEAD"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if clean.returncode else "")
