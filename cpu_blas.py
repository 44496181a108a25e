"""Bind MLX's CPU matmuls to a fast BLAS on Linux: Intel MKL if installed, else OpenBLAS.

MLX's Linux CPU wheel links the reference BLAS, about 50x slower than OpenBLAS for
large float32 products. Loading a BLAS library globally before the first
`import mlx.core` makes MLX's BLAS symbols resolve there. MKL (pip package `mkl`, on
x86-64) is tried first: its one-row products, the whole cost of a decoding step, run
about twice as fast as OpenBLAS's here. Import this module before MLX in every entry
point. MLX_T5_BLAS=mkl, openblas or reference picks one; the default tries MKL, then
OpenBLAS. (MLX_T5_NO_OPENBLAS=1, the older switch, means reference.)

Once mlx.core is loaded its BLAS symbols are bound for good, so importing this module
after it, with a fast BLAS wanted and installed, raises BindingLost (an ImportError)
that says how to fix the order, instead of running 50x slower unseen.
"""

import ctypes
import os
import site
import sys
from pathlib import Path

# pip installs MKL's libraries into <environment>/lib (or ~/.local/lib with --user),
# which the loader does not search; the bare names cover system-wide installs.
MKL_FOLDERS = [Path(sys.prefix) / "lib", Path(site.getuserbase()) / "lib"]
MKL_NAMES = ["libmkl_rt.so.3", "libmkl_rt.so.2"]
LIBRARIES = {
    "mkl": [str(folder / name) for folder in MKL_FOLDERS for name in MKL_NAMES] + MKL_NAMES,
    "openblas": ["libopenblas.so.0", "libopenblas.so"],
}


def wanted():
    """The BLAS families to try, in order, from the environment."""
    if os.environ.get("MLX_T5_NO_OPENBLAS"):
        return []
    choice = os.environ.get("MLX_T5_BLAS", "").lower()
    if choice == "reference":
        return []
    if choice in LIBRARIES:
        return [choice]
    return list(LIBRARIES)


class BindingLost(ImportError):
    """mlx.core was imported before this module could bind a fast BLAS for it."""


def load_blas():
    """Load the first BLAS found with RTLD_GLOBAL; return its file name, or None.

    Raises BindingLost when mlx.core is already loaded and one is installed.
    """
    if not sys.platform.startswith("linux"):
        return None
    families = wanted()
    if not families:
        return None
    late = "mlx.core" in sys.modules  # MLX's BLAS symbols were bound when it loaded
    for family in families:
        for name in LIBRARIES[family]:
            try:
                ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL if late else ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            if late:
                raise BindingLost(
                    f"mlx.core was imported before cpu_blas could bind {Path(name).name}: MLX's float32 products "
                    f"would run on the reference BLAS, about 50x slower. Import cpu_blas (or model) first, "
                    f"before mlx and any module that imports it, or set MLX_T5_BLAS=reference to run on it anyway.")
            return Path(name).name
    print(
        "warning: neither MKL nor OpenBLAS found; MLX's CPU matmuls will be slow "
        "(pip install mkl, or Debian/Ubuntu: apt-get install libopenblas0-pthread)",
        file=sys.stderr,
    )
    return None


LOADED = load_blas()
