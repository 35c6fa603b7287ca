"""Imported first by every stage script: this checkout's `src/` goes ahead of any installed sstl.

DVC runs queued and `--temp` experiments in a copy of the project; the editable install points at
the original checkout, so without this a modified module would be hashed by DVC but not run.
"""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
