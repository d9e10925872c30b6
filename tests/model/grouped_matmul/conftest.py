"""The grouped-matmul tests share `grouped_matmul_oracle.py`; the suite runs with --import-mode=importlib, so
this folder goes on sys.path for it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
