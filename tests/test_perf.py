"""sae_ext.perf: the opt-in glibc allocator setting the ``sae-ext`` commands run with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from sae_ext.perf import retain_freed_memory as r; print(r(), r())"


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SAE_EXT_KEEP_MALLOC"} | env_extra
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_applies_once_on_linux() -> None:
    assert _run({}).split() == ["True", "True"]


def test_opt_out_leaves_the_allocator_alone() -> None:
    assert _run({"SAE_EXT_KEEP_MALLOC": "1"}).split() == ["False", "False"]
