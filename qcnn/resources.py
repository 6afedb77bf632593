"""Files bundled with qcnn: the default model and a sample image.

They live in the repository's top-level ``weights/`` folder, which the
package reaches as ``qcnn/_weights`` (a link in the source tree, real files
in an installed wheel).
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "_weights"
FASHION_MNIST_MODEL = WEIGHTS_DIR / "fashion_mnist.qcnn"
DEFAULT_MODEL = FASHION_MNIST_MODEL
SAMPLE_IMAGE = WEIGHTS_DIR / "samples" / "fashion_sneaker.png"
