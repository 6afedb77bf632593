"""Product quantization of weights: codebook learning and codes (Q-CNN, section 1).

Modules: :mod:`qcnn.quantization.kmeans` (``kmeans``: k-means in many subspaces),
:mod:`qcnn.quantization.pq` (sub-vectors of conv / inner-product weights, codes).
"""
