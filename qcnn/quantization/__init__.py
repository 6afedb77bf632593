"""Product quantization of weights: codebook learning and codes (Q-CNN, section 1)."""

from qcnn.quantization.kmeans import KMeansResult, kmeans

__all__ = ["KMeansResult", "kmeans"]
