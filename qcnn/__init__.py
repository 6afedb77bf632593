"""qcnn: Quantized CNN (Wu et al., CVPR 2016) in NumPy.

Main entry points::

    net = qcnn.load("model.qcnn")                     # qcnn's own format
    net = qcnn.load_caffe("deploy.prototxt", "weights.caffemodel")
    out = net.forward(batch)                          # {blob name: array}
    qcnn.save(net, "model.qcnn")
"""

from qcnn.errors import QcnnError, QcnnWarning
from qcnn.graph import Net
from qcnn.io.caffe import load_caffe
from qcnn.io.modelfile import load, save

__version__ = "0.1.0"
__all__ = ["Net", "QcnnError", "QcnnWarning", "load", "load_caffe", "save", "__version__"]
