"""What every bench result records beside its figures: the command that made it, the commit and the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def provenance() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "command": " ".join([f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "commit": commit,
        "cpu_cores": os.cpu_count(),
    }
