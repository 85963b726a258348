import sys
from pathlib import Path

# onnx_toy_model.py is a test helper module beside these tests
sys.path.insert(0, str(Path(__file__).parent))
