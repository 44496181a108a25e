"""Bind MLX's CPU matmuls to the system OpenBLAS on Linux.

MLX's Linux CPU wheel links the reference BLAS, about 50x slower than OpenBLAS for
large float32 products. Loading OpenBLAS globally before the first `import mlx.core`
makes MLX's BLAS symbols resolve there. Import this module before MLX in every entry
point. Set MLX_T5_NO_OPENBLAS=1 to keep the reference BLAS.
"""

import ctypes
import os
import sys

OPENBLAS_LIBRARIES = ("libopenblas.so.0", "libopenblas.so")


def load_openblas():
    """Load OpenBLAS with RTLD_GLOBAL; return the library name, or None."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_T5_NO_OPENBLAS"):
        return None
    if "mlx.core" in sys.modules:
        print("warning: cpu_blas imported after mlx.core; OpenBLAS not used", file=sys.stderr)
        return None
    for name in OPENBLAS_LIBRARIES:
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    print(
        "warning: OpenBLAS not found; MLX's CPU matmuls will be slow "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread)",
        file=sys.stderr,
    )
    return None


LOADED = load_openblas()
