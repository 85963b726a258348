import sys
from pathlib import Path

# toy_model.py is a test helper module beside these tests
sys.path.insert(0, str(Path(__file__).parent))
