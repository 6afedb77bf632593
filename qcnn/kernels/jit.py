"""Numba compilation helpers: where compiled kernels are cached, and serial + parallel copies.

Cache directory
---------------
Every kernel is compiled with ``cache=True``: the first process that runs it
compiles it (seconds per kernel on x86, about 15 times longer on a small ARM
board) and writes the machine code to disk; later processes load it. Importing
this module (which ``qcnn.kernels`` does before any kernel module) chooses the
directory, before any kernel is decorated:

1. ``NUMBA_CACHE_DIR``, when set: Numba's own setting, left alone (it applies
   to every Numba library in the process);
2. else ``QCNN_CACHE_DIR``, when set;
3. else ``__pycache__`` beside the kernel modules, when it can be written (a
   source checkout, a virtual environment the user owns): Numba's default;
4. else (site-packages read-only) ``$XDG_CACHE_HOME/qcnn``, by default
   ``~/.cache/qcnn``; when that cannot be written either, ``qcnn-cache-UID``
   in the temporary directory.

In cases 2 and 4 this module sets ``NUMBA_CACHE_DIR`` (child processes inherit
it) and reloads Numba's configuration, so it works even when Numba was
imported first. Without case 4, Numba would fall back to its own user-wide
directory and, when that is not writable either, refuse to import the kernels
("cannot cache function ... no locator available"). Entries are keyed by the
source file's path, contents, the Numba version and the CPU, so one directory
can serve several environments and machines. ``qcnn warmup`` compiles
everything once and prints the directory.

Serial and parallel copies
--------------------------
Kernels are written once with ``numba.prange``; :func:`serial_and_parallel`
compiles one copy with ``parallel=False`` (``prange`` is then ``range``) and
one with ``parallel=True``, both with ``cache=True``. The copies get distinct
names because Numba's on-disk cache is keyed by the function's name and line:
two dispatchers of one function would overwrite each other's cache entries.
"""

import os
import tempfile
import types

import numba
import numba.core.config

CACHE_ENV = "QCNN_CACHE_DIR"
KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))


def writable_dir(path):
    """True when ``path`` exists or can be made, and a file can be created in it (as Numba checks)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def user_cache_dir(environ=os.environ):
    """``$XDG_CACHE_HOME/qcnn`` or ``~/.cache/qcnn`` (None when there is no usable home)."""
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec: relative values are ignored
        home = environ.get("HOME") or os.path.expanduser("~")
        if not os.path.isabs(home):
            return None
        base = os.path.join(home, ".cache")
    return os.path.join(base, "qcnn")


def choose_cache_dir(environ=os.environ, kernels_dir=KERNELS_DIR, writable=writable_dir):
    """``(directory, reason, set_numba)``: where compiled kernels go and why (module notes).

    ``set_numba`` is True when ``NUMBA_CACHE_DIR`` must be set to ``directory``.
    """
    if environ.get("NUMBA_CACHE_DIR"):
        return os.path.abspath(environ["NUMBA_CACHE_DIR"]), "NUMBA_CACHE_DIR", False
    if environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(environ[CACHE_ENV])), CACHE_ENV, True
    in_tree = os.path.join(kernels_dir, "__pycache__")
    if writable(in_tree):
        return in_tree, "beside the package", False
    user = user_cache_dir(environ)
    if user is not None and writable(user):
        return user, "package directory read-only: user cache", True
    uid = os.getuid() if hasattr(os, "getuid") else 0
    fallback = os.path.join(tempfile.gettempdir(), f"qcnn-cache-{uid}")
    return fallback, "package directory and user cache read-only: temporary directory", True


def _configure():
    environ = dict(os.environ)
    if not environ.get("NUMBA_CACHE_DIR") and numba.core.config.CACHE_DIR:
        environ["NUMBA_CACHE_DIR"] = numba.core.config.CACHE_DIR  # from a .numba_config.yaml
    directory, reason, set_numba = choose_cache_dir(environ)
    if set_numba:
        os.environ["NUMBA_CACHE_DIR"] = directory
        numba.core.config.reload_config()
        if numba.core.config.CACHE_DIR != directory:  # reload_config() is lazy; make sure
            numba.core.config.CACHE_DIR = directory
    return directory, reason


CACHE_DIR, CACHE_REASON = _configure()

# The parallel kernels run on Numba's OpenMP layer. With OpenMP's default wait policy its idle
# workers spin, and on a machine whose other cores are busy (OpenBLAS threads spinning after a
# dense layer, another process) a call then waits for a preempted spinner: a fixed 5-12 ms on a
# 2-core machine, against 0.3-0.5 ms when they sleep (benchmarks/bench_lut.py --threads 2). Read when OpenMP
# first loads, which the first parallel kernel call does; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def readonly(array):
    """``array`` as a read-only view (itself when it is read-only already).

    Numba compiles a kernel separately for read-only and writable array arguments. The weights
    of a model loaded from a file are read-only (memory-mapped), those of a model built or
    quantized in memory writable: passing weight arguments through this gives each kernel one
    compiled signature for both, the one ``qcnn warmup`` compiles.
    """
    if not array.flags.writeable:
        return array
    view = array.view()
    view.flags.writeable = False
    return view


def serial_and_parallel(func, **options):
    """``(serial, parallel)`` jitted copies of ``func`` (``cache=True``, ``nogil=True``)."""
    variants = []
    for parallel in (False, True):
        name = f"{func.__name__}_{'parallel' if parallel else 'serial'}"
        copy = types.FunctionType(func.__code__, func.__globals__, name, func.__defaults__,
                                  func.__closure__)
        copy.__qualname__ = name
        copy.__module__ = func.__module__
        variants.append(numba.njit(cache=True, nogil=True, parallel=parallel, **options)(copy))
    return tuple(variants)
