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


def run_python(code, choice=""):
    env = {"MLX_T5_BLAS": choice, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def fast_blas_installed():
    return run_python("import cpu_blas; print(cpu_blas.LOADED)").stdout.strip() != "None"


# Modules that import MLX (found in the sources, so new ones are covered too), and what
# a user's script, a test or another module may import first.
MLX_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts)
    for path in [*ROOT.glob("*.py"), *ROOT.glob("models/*.py")]
    if path.name != "cpu_blas.py" and any(line.startswith(("import mlx", "from mlx"))
                                          for line in path.read_text(encoding="utf-8").splitlines())
)
ENTRY_POINTS = [name for name in ("main", "benchmark", "convert", "model", "server", "api") if (ROOT / f"{name}.py").exists()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is for Linux")
def test_mlx_imported_first_fails_loudly():
    if not fast_blas_installed():
        pytest.skip("neither MKL nor OpenBLAS is installed here")
    result = run_python("import mlx.core; import model")
    assert result.returncode != 0 and "BindingLost" in result.stderr and "MLX_T5_BLAS=reference" in result.stderr
    # Asked for, the reference BLAS runs, and its products are right.
    result = run_python("import mlx.core as mx; import model, cpu_blas; "
                        "print(cpu_blas.LOADED, mx.allclose(mx.ones((4, 8)) @ mx.ones((8, 3)), mx.full((4, 3), 8.0)).item())",
                        "reference")
    assert result.returncode == 0 and result.stdout.split() == ["None", "True"], result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is for Linux")
@pytest.mark.parametrize("module", MLX_MODULES)
def test_every_module_that_loads_mlx_binds_the_blas_first(module):
    """Imported first, each module of the project binds the fast BLAS before MLX loads, so no
    import order of the project's own modules loses the binding."""
    if not fast_blas_installed():
        pytest.skip("neither MKL nor OpenBLAS is installed here")
    result = run_python(f"import {module}; import cpu_blas, model; print(cpu_blas.LOADED)")
    assert result.returncode == 0 and result.stdout.split()[-1] != "None", (result.stdout, result.stderr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the binding is for Linux")
@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_points_bind_before_mlx(module):
    if not fast_blas_installed():
        pytest.skip("neither MKL nor OpenBLAS is installed here")
    result = run_python(f"import {module}\n{PROBE}")  # the entry point first, then mlx.core and the probe
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["loaded"] and any(name in found["owner"] for name in ("mkl", "openblas")) and found["error"] < 1e-3
