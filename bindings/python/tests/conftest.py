import os
import pathlib
import sys

# Import the package from this checkout without installing it.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# CI installs torch (CPU) and sets this, so that the PyTorch tests cannot
# be skipped there unnoticed.
if os.environ.get("PERCEPTUAL_LOSS_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401
    import torchvision  # noqa: F401
