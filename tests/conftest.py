import sys
from pathlib import Path

# test helpers (tiny_models, s2_reference) import as top-level modules
sys.path.insert(0, str(Path(__file__).parent))
