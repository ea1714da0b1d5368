"""The fuzz harnesses (fuzz/targets) are importable here: the regression tests run them in-process on saved inputs."""
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
if str(FUZZ) not in sys.path:
    sys.path.insert(0, str(FUZZ))
