"""Re-create the tiny trained models the fast tests use (Testing/models/*.lcs), in about 5 minutes on 2 CPU cores:

    .venv/bin/python Testing/make_test_models.py

Run it when the checkpoint format, the model or the training recipe changes. The slow tier (`make test-slow`)
trains the same settings from scratch and checks that they still learn (test_training.py).
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from conftest import MODELS, tiny_settings
from lcs_training.data import write_colin27_aal
from lcs_training.train import train


def main() -> int:
    MODELS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_colin27_aal(Path(tmp) / "colin27")
        for name, baseline in (("tiny", False), ("tiny_baseline", True)):
            best = train(tiny_settings(data, Path(tmp) / name, baseline))
            shutil.copy(best, MODELS / f"{name}.lcs")
            print(f"wrote {MODELS / f'{name}.lcs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
