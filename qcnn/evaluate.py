"""Class probabilities of a network over a dataset, accuracy, and agreement with a reference model."""

import numpy as np

from qcnn.errors import QcnnError

# Probabilities are clipped to this before logarithms, so a class one model rules out
# entirely gives a large but finite KL divergence rather than infinity.
_TINY = 1e-12


def probabilities(net, scores, output):
    """Class probabilities from the scores in blob ``output``: float64 (N, classes).

    Scores already produced by a Softmax layer are used as they are; others get a softmax.
    """
    producer = [layer for layer in net.layers if output in layer.tops][-1:]
    scores = scores.reshape(len(scores), -1).astype(np.float64)
    if not producer or producer[0].type != "Softmax":
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = e / e.sum(axis=1, keepdims=True)
    if not np.isfinite(scores).all():
        raise QcnnError(f"network '{net.name}' produced NaN or infinite outputs")
    return scores


def predict(net, batches, output=None):
    """Run ``net`` over ``batches`` of inputs.

    Parameters
    ----------
    net : Net
    batches : iterable of ndarray (B, C, H, W)
    output : str, optional
        Blob with the class scores (default: the network's first output).

    Returns
    -------
    ndarray float64 (N, classes)
    """
    output = output or net.outputs[0]
    parts = [probabilities(net, net.forward(x, [output])[output], output) for x in batches]
    if not parts:
        raise QcnnError("no inputs to evaluate")
    return np.concatenate(parts)


def top_k(probs, k):
    """Indices of the ``k`` most probable classes per row, best first: int (N, k)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def accuracy(probs, labels):
    """Top-1 and top-5 accuracy of ``probs`` (N, classes) for int ``labels`` (N,)."""
    labels = np.asarray(labels)
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise QcnnError(f"labels run from {labels.min()} to {labels.max()}, but the model has "
                        f"{probs.shape[1]} classes")
    top = top_k(probs, min(5, probs.shape[1]))
    return {"top1_accuracy": float(np.mean(top[:, 0] == labels)),
            "top5_accuracy": float(np.mean((top == labels[:, None]).any(axis=1)))}


def agreement(reference, probs):
    """How closely ``probs`` follows a reference model's ``reference`` probabilities.

    Parameters
    ----------
    reference, probs : ndarray float (N, classes)

    Returns
    -------
    dict
        ``top1_agreement``: same most probable class; ``top5_agreement``: the
        reference's top class is among the model's five best; ``mean_kl``:
        mean KL(reference || model) in nats; ``mean_abs_top1_change``: mean
        change of the probability of the reference's top class.
    """
    if reference.shape != probs.shape:
        raise QcnnError(f"the reference gives {reference.shape[1]} classes for {len(reference)} inputs, "
                        f"the model {probs.shape[1]} for {len(probs)}")
    ref_top = top_k(reference, 1)[:, 0]
    top = top_k(probs, min(5, probs.shape[1]))
    p, q = np.clip(reference, _TINY, 1), np.clip(probs, _TINY, 1)
    rows = np.arange(len(ref_top))
    return {"top1_agreement": float(np.mean(top[:, 0] == ref_top)),
            "top5_agreement": float(np.mean((top == ref_top[:, None]).any(axis=1))),
            "mean_kl": float(np.mean(np.sum(reference * (np.log(p) - np.log(q)), axis=1))),
            "mean_abs_top1_change": float(np.mean(np.abs(probs[rows, ref_top] - reference[rows, ref_top])))}
