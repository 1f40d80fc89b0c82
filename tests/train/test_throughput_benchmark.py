"""benchmarks/train_throughput.py: a usage error, not a traceback, for too few steps."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_too_few_steps_is_a_usage_error_before_any_work():
    script = os.path.join(ROOT, "benchmarks", "train_throughput.py")
    proc = subprocess.run(
        [sys.executable, script, "--steps", "2"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "--steps: at least 3 (the first 2 are warm-up), got 2" in proc.stderr
    assert "Traceback" not in proc.stderr
