"""Numba compilation helpers: every kernel exists compiled serially and in parallel.

Kernels are written once with ``numba.prange``; :func:`serial_and_parallel`
compiles one copy with ``parallel=False`` (``prange`` is then ``range``) and
one with ``parallel=True``, both with ``cache=True``. The copies get distinct
names because Numba's on-disk cache is keyed by the function's name and line:
two dispatchers of one function would overwrite each other's cache entries.

The cache directory is Numba's: ``NUMBA_CACHE_DIR`` when set, else
``__pycache__`` next to this package (or a user cache directory when that is
read-only).
"""

import types

import numba


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
