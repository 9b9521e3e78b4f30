"""What importing a module drags in, seen from a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys


def heavy_imports(module: str, heavy: set[str]) -> list[str]:
    """The modules of ``heavy`` that importing ``module`` loads, in a fresh process (sorted)."""
    probe = f"import json, sys, {module}; print(json.dumps(sorted(set({sorted(heavy)!r}) & set(sys.modules))))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])
