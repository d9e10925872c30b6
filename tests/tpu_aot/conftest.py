"""The tpu_aot tests share `tpu_topology.py` (virtual TPU devices); the suite runs with
--import-mode=importlib, so this folder goes on sys.path for it."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
