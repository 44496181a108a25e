"""cpu_blas.py: MLX's float32 products bind to the BLAS the environment asks for, and stay right."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

# Run in a fresh interpreter: the binding happens once, before MLX is imported.
PROBE = """
import ctypes, json
import cpu_blas
import mlx.core as mx
import numpy as np

class Info(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

def owner(symbol):
    # The library a global lookup of `symbol` finds first: where MLX's call lands.
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p)
    except AttributeError:  # no library in the global scope defines it
        return None
    info = Info()
    ctypes.CDLL("libdl.so.2").dladdr(address, ctypes.byref(info))
    return info.fname.decode()

rng = np.random.default_rng(0)
a, b = rng.standard_normal((6, 512), np.float32), rng.standard_normal((512, 300), np.float32)
ours = np.array(mx.array(a) @ mx.array(b))
print(json.dumps(dict(loaded=cpu_blas.LOADED, owner=owner("cblas_sgemm"),
                      error=float(np.abs(ours - a.astype(np.float64) @ b).max()))))
"""


def probe(choice):
    env = {"MLX_T5_BLAS": choice, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is for Linux")
@pytest.mark.parametrize("choice, library", [("mkl", "libmkl_rt"), ("openblas", "libopenblas")])
def test_products_bind_to_the_chosen_blas(choice, library):
    found = probe(choice)
    if found["loaded"] is None:
        pytest.skip(f"{library} is not installed here")
    assert found["loaded"].startswith(library)
    assert library in found["owner"]
    assert found["error"] < 1e-3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is for Linux")
def test_reference_keeps_mlx_own_blas():
    found = probe("reference")
    assert found["loaded"] is None
    assert found["owner"] is None or not any(name in found["owner"] for name in ("mkl", "openblas"))
    assert found["error"] < 1e-3
