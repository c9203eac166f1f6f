import os
import sys
from pathlib import Path

# Tiny models on 2 cores: one thread per process (otherwise steps are ~25x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
