"""Files bundled with qcnn: the default model and sample images.

They live in the repository's top-level ``weights/`` folder, which the
package reaches as ``qcnn/_weights`` (a link in the source tree, real files
in an installed wheel).
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "_weights"
# EfficientNet-Lite0 (ImageNet-1000), product-quantized by scripts/build_default_model.py
EFFICIENTNET_LITE0_PQ = WEIGHTS_DIR / "imagenet" / "efficientnet_lite0_pq.qcnn"
# A small float CNN trained on Fashion-MNIST by scripts/train_fashion_mnist.py
FASHION_MNIST_MODEL = WEIGHTS_DIR / "fashion_mnist.qcnn"
DEFAULT_MODEL = EFFICIENTNET_LITE0_PQ
SAMPLE_IMAGE = WEIGHTS_DIR / "samples" / "coffee.jpg"
