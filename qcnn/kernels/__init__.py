"""Numba kernels (compiled on first use and cached on disk).

Each module holds the loops of one concept (``kmeans``, ``lut``, ``depthwise``,
``ec``) and imports nothing from the rest of qcnn except :mod:`qcnn.kernels.simd`
(8-lane vector intrinsics) and :mod:`qcnn.kernels.jit`, which is
imported here first: it chooses Numba's cache directory before any kernel
module is decorated (``QCNN_CACHE_DIR``; see its notes).
"""

from qcnn.kernels import jit  # noqa: F401  (sets the cache directory; must come first)
