"""Runs a Node script over the page's own code (cut out of static/index.html)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")

needs_node = pytest.mark.skipif(NODE is None, reason="needs Node.js to run the page's code")


def run_page_sim(script: str, arg: str, timeout: float) -> dict[str, Any]:
    """The JSON the script ``script`` (beside this file) prints for ``arg``."""
    assert NODE is not None
    out = subprocess.run(
        [NODE, str(Path(__file__).with_name(script)), str(REPO / "static" / "index.html"), arg],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result
