"""The embedded demo model pair (a small Python-code model and its draft), trained by tools/train_demo_pair.py."""
from pathlib import Path

DEMO_DIR = Path(__file__).parent / "demo"
DEMO_TARGET = str(DEMO_DIR / "target")
DEMO_DRAFT = str(DEMO_DIR / "draft")
