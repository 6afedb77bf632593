"""Numba kernels (compiled on first use and cached on disk).

Each module holds the loops of one concept (``kmeans``, ``lut``) and imports
nothing from the rest of qcnn except :mod:`qcnn.kernels.jit`.
"""
