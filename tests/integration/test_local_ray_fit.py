"""README's `specray generate --engine ray --num-target-stages 2` on this machine, as a user runs it.

With no Ray running, the engine starts a local one and scales its actors' CPU requests to the
machine (a draft and two stages ask for 3 CPUs; CI and developers have 2), so the command finishes
instead of waiting forever for a placement. Both transports."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")


@pytest.mark.parametrize("transport", ["graph", "calls"])
def test_generate_through_two_stages_fits_this_machine(transport):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "specray.cli", "generate", "--engine", "ray", "--num-target-stages",
                          "2", "--transport", transport, "--prompt", "def add(a, b):", "--max-tokens", "12", "--json"],
                         check=False, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 12
