"""Numba's cache directory (QCNN_CACHE_DIR, read-only site-packages) and ``qcnn warmup``.

The subprocess tests run a fresh interpreter, so that the cache directory is chosen at import
as it is for a user; the warm-up test compiles every kernel into an empty directory once (the
only way to see that no kernel escapes the warm-up) and then checks that a second process
compiles nothing.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qcnn
from qcnn.kernels import jit

PACKAGE = Path(qcnn.__file__).resolve().parent
CACHE_VARIABLES = ("NUMBA_CACHE_DIR", "QCNN_CACHE_DIR", "XDG_CACHE_HOME")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    env.update(extra)
    return env


def run_python(code, env, cwd):
    result = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


# Imports every kernel module, then prints where each kernel's cache entries go (no compiling).
WHERE = """
import json, os, sys
if sys.argv[1:] != ["no-numba-first"]:
    import numba  # imported before qcnn: the cache directory must still take effect
import qcnn.warmup
from qcnn.kernels import jit
print(json.dumps({"qcnn": qcnn.warmup.__file__, "dir": jit.CACHE_DIR, "reason": jit.CACHE_REASON,
                  "env": os.environ.get("NUMBA_CACHE_DIR"),
                  "paths": {n: d.stats.cache_path for n, d in qcnn.warmup.dispatchers().items()}}))
"""


@pytest.mark.arm
def test_choose_cache_dir_order(tmp_path):
    writable = {str(tmp_path / "pkg" / "__pycache__"): False, "/home/u/.cache/qcnn": True,
                "/xdg/qcnn": True}

    def choose(**environ):
        return jit.choose_cache_dir(environ, str(tmp_path / "pkg"), lambda d: writable.get(d, False))

    both = choose(NUMBA_CACHE_DIR="/n", QCNN_CACHE_DIR="/q", HOME="/home/u")
    assert both == ("/n", "NUMBA_CACHE_DIR", False)
    assert choose(QCNN_CACHE_DIR="/q", HOME="/home/u") == ("/q", "QCNN_CACHE_DIR", True)
    assert choose(HOME="/home/u")[:1] == ("/home/u/.cache/qcnn",)
    assert choose(HOME="/home/u", XDG_CACHE_HOME="/xdg")[0] == "/xdg/qcnn"
    assert choose(HOME="/home/u", XDG_CACHE_HOME="relative")[0] == "/home/u/.cache/qcnn"  # XDG spec
    fallback, reason, set_numba = choose(HOME="/nonexistent")
    assert Path(fallback).name.startswith("qcnn-cache-") and "temporary" in reason and set_numba
    writable[str(tmp_path / "pkg" / "__pycache__")] = True
    assert choose(HOME="/home/u") == (str(tmp_path / "pkg" / "__pycache__"), "beside the package", False)


@pytest.mark.arm
def test_qcnn_cache_dir_moves_every_kernel(tmp_path):
    cache = tmp_path / "cache"
    out = json.loads(run_python(WHERE, clean_env(QCNN_CACHE_DIR=str(cache)), tmp_path))
    assert out["dir"] == out["env"] == str(cache) and out["reason"] == "QCNN_CACHE_DIR"
    assert out["paths"], "no kernels found"
    assert all(Path(p).parent == cache for p in out["paths"].values()), out["paths"]


@pytest.mark.arm
def test_numba_cache_dir_wins(tmp_path):
    env = clean_env(QCNN_CACHE_DIR=str(tmp_path / "qcnn"), NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = json.loads(run_python(WHERE, env, tmp_path))
    assert out["reason"] == "NUMBA_CACHE_DIR"
    assert all(Path(p).parent == tmp_path / "numba" for p in out["paths"].values())


@pytest.mark.arm
def test_openmp_workers_sleep_unless_the_user_says(tmp_path):
    """The kernels' OpenMP workers wait passively (qcnn.kernels.jit) unless OMP_WAIT_POLICY is set."""
    code = "import os, qcnn.kernels.jit; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert run_python(code, env, tmp_path).strip() == "PASSIVE"
    assert run_python(code, {**env, "OMP_WAIT_POLICY": "active"}, tmp_path).strip() == "active"


def read_only_copy(tmp_path):
    """The qcnn package copied to tmp_path/site, read-only; its __pycache__ blocked for root too."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "qcnn", ignore=shutil.ignore_patterns("__pycache__", "_weights"))
    for pkg in (site / "qcnn").rglob("__init__.py"):
        (pkg.parent / "__pycache__").write_text("a file where Numba would make a directory")
    for path in sorted(site.rglob("*"), reverse=True) + [site]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return site


def quantized_model(path):
    """A model on every inference kernel (a float depthwise conv; on lookup tables a conv, inner
    products with K <= 32 and K > 32) saved to ``path``."""
    from qcnn.layers.conv import Convolution
    from qcnn.layers.quantized import QuantizedConvolution, QuantizedInnerProduct

    rng = np.random.default_rng(0)

    def blobs(c_out, channels, kernel, subdim, k):
        m = -(-channels // subdim)
        return [rng.standard_normal((1, m, k, subdim)).astype(np.float32),
                rng.integers(0, k, (c_out, kernel, kernel, m)).astype(np.uint8),
                rng.standard_normal(c_out).astype(np.float32)]

    depthwise = [rng.standard_normal((16, 1, 3, 3)).astype(np.float32),
                 rng.standard_normal(16).astype(np.float32)]
    layers = [
        Convolution("dw", ["x"], ["d"], depthwise, num_output=16, kernel_size=3, pad=1, group=16),
        QuantizedConvolution("conv", ["d"], ["c"], blobs(8, 16, 3, 8, 16), num_output=8, kernel_size=3,
                             subdim=8, num_codewords=16, kernel="lut"),
        QuantizedInnerProduct("fc1", ["c"], ["f"], blobs(24, 128, 1, 4, 16), num_output=24, subdim=4,
                              num_codewords=16, kernel="lut"),
        QuantizedInnerProduct("fc2", ["f"], ["y"], blobs(10, 24, 1, 4, 64), num_output=10, subdim=4,
                              num_codewords=64, kernel="lut"),
    ]
    qcnn.save(qcnn.Net({"x": (1, 16, 6, 6)}, layers), path)


# Runs a saved quantized model (memory-mapped, as `qcnn classify` does) at several batch sizes.
INFERENCE = """
import sys
import numpy as np
import qcnn
net = qcnn.load(sys.argv[1])
for n in (1, 3, 8, 16):
    net.forward(np.random.default_rng(n).standard_normal((n, 16, 6, 6)).astype(np.float32))
"""


def make_writable(root):
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_read_only_package_caches_in_home_then_warmup_is_complete(tmp_path):
    """Site-packages read-only: the cache goes to ~/.cache/qcnn; a cold warm-up compiles every
    kernel there, and the next process loads them all from it."""
    site = read_only_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), PYTHONPATH=str(site))
    try:
        out = json.loads(run_python(WHERE, env, tmp_path))
        assert Path(out["qcnn"]).parent == site / "qcnn"
        cache = home / ".cache" / "qcnn"
        assert out["dir"] == str(cache) and "read-only" in out["reason"]
        assert all(Path(p).parent == cache for p in out["paths"].values())

        warm_up = [sys.executable, "-m", "qcnn.cli", "warmup"]
        cold = subprocess.run(warm_up + ["--json"], check=False, env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=1800)
        assert cold.returncode == 0, cold.stderr
        report = json.loads(cold.stdout)
        assert report["cache_dir"] == str(cache)
        not_compiled = {k: s for k, s in report["kernels"].items() if s not in ("compiled", "inlined")}
        assert not not_compiled, f"kernels that no warm-up step compiles: {not_compiled}"
        assert set(report["kernels"]) == set(out["paths"])
        assert {r["variant"] for r in report["steps"]} == {"serial", "parallel"}
        cached = sorted(cache.rglob("*.nb[ic]"))
        assert any(p.suffix == ".nbi" for p in cached) and any(p.suffix == ".nbc" for p in cached)
        assert not [p for p in site.rglob("*") if p.suffix in (".nbi", ".nbc")]

        # inference on a loaded model after the warm-up compiles nothing (writes no cache entry)
        quantized_model(tmp_path / "q.qcnn")
        inference = subprocess.run([sys.executable, "-c", INFERENCE, str(tmp_path / "q.qcnn")], check=False,
                                   env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert inference.returncode == 0, inference.stderr
        assert sorted(cache.rglob("*.nb[ic]")) == cached, "inference compiled kernels the warm-up did not"

        warm = subprocess.run(warm_up, check=False, env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert warm.returncode == 0, warm.stderr
        assert f"Numba cache: {cache} (" in warm.stdout
        total = warm.stdout.strip().splitlines()[-1]
        assert f"{len(report['kernels'])} kernels: 0 compiled, " in total, warm.stdout
        assert "loaded from the cache" in total and "warning" not in warm.stderr
        print(f"cold warm-up {report['seconds']:.1f} s; warm: {total}")
    finally:
        make_writable(site)
