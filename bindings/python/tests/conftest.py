import os
import pathlib
import sys

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]

if os.environ.get("PERCEPTUAL_LOSS_TEST_INSTALLED") == "1":
    # CI runs these tests against the installed wheel: the package and its
    # library must come from site-packages, with no help from the checkout.
    assert "PERCEPTUAL_LOSS_LIB" not in os.environ, "PERCEPTUAL_LOSS_LIB would bypass the installed library"
    import perceptual_loss

    where = pathlib.Path(perceptual_loss.__file__).resolve()
    assert PACKAGE_ROOT not in where.parents, f"perceptual_loss was imported from the checkout: {where}"
    assert perceptual_loss._lib.path.parent == where.parent, perceptual_loss._lib.path
else:
    # Import the package from this checkout without installing it.
    sys.path.insert(0, str(PACKAGE_ROOT))

# CI installs torch (CPU) and sets this, so that the PyTorch tests cannot
# be skipped there unnoticed; and the lpips package, the reference of
# test_lpips.py, with its own flag (the GPU machine may not have it).
if os.environ.get("PERCEPTUAL_LOSS_REQUIRE_TORCH") == "1":
    import torch  # noqa: F401
    import torchvision  # noqa: F401
if os.environ.get("PERCEPTUAL_LOSS_REQUIRE_LPIPS") == "1":
    import lpips  # noqa: F401
