import sys
from pathlib import Path

# Tests import normuon.py and train_gpt.py from the repository root and helpers from tests/.
sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent / "tests")]
