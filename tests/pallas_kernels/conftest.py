"""The suite runs with --import-mode=importlib: make the shared FlashMask oracle (flashmask_oracle.py) importable."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
