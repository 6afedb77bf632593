"""Accuracy and agreement measures, and ``qcnn evaluate`` on the bundled model."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from scipy.special import softmax
from scipy.stats import entropy

import qcnn
from qcnn.cli import main
from qcnn.evaluate import accuracy, agreement, probabilities
from qcnn.resources import FASHION_MNIST_MODEL, WEIGHTS_DIR

SAMPLES = {"fashion_sneaker.png": 7, "fashion_trouser.png": 1, "fashion_bag.png": 8,
           "fashion_ankle_boot.png": 9}


def _random_probs(rng, n, classes):
    return softmax(rng.normal(0, 3, (n, classes)), axis=1)


@settings(deadline=None, max_examples=30)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20), st.integers(2, 12))
def test_agreement_against_direct_definitions(seed, n, classes):
    rng = np.random.default_rng(seed)
    ref, probs = _random_probs(rng, n, classes), _random_probs(rng, n, classes)
    result = agreement(ref, probs)
    ref_top = [int(np.argmax(r)) for r in ref]
    assert result["top1_agreement"] == pytest.approx(np.mean([np.argmax(p) == t for p, t in zip(probs, ref_top)]))
    in_top5 = [t in sorted(range(classes), key=lambda c: -p[c])[:5] for p, t in zip(probs, ref_top)]
    assert result["top5_agreement"] == pytest.approx(np.mean(in_top5))
    assert result["mean_kl"] == pytest.approx(np.mean([entropy(r, p) for r, p in zip(ref, probs)]), rel=1e-9)
    same = agreement(ref, ref)
    assert same["top1_agreement"] == 1 and same["mean_kl"] == pytest.approx(0, abs=1e-12)


def test_accuracy_and_label_range():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    assert accuracy(probs, np.array([1, 2, 2])) == {"top1_accuracy": pytest.approx(2 / 3),
                                                     "top5_accuracy": 1.0}
    with pytest.raises(qcnn.QcnnError, match="labels run from 0 to 3"):
        accuracy(probs, np.array([0, 3, 1]))


def test_probabilities_apply_softmax_unless_the_net_ends_in_one():
    net = qcnn.load(FASHION_MNIST_MODEL)
    scores = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    last = net.layers[-1]
    if last.type == "Softmax":
        np.testing.assert_allclose(probabilities(net, scores, last.tops[0]), scores)
        np.testing.assert_allclose(probabilities(net, scores, last.bottoms[0]), softmax(scores.astype(np.float64), axis=1))
    else:
        np.testing.assert_allclose(probabilities(net, scores, last.tops[0]), softmax(scores.astype(np.float64), axis=1))


@pytest.fixture
def sample_data(tmp_path):
    """The bundled samples as a labelled .npz (grey pixels) and as class folders."""
    samples = WEIGHTS_DIR / "samples"
    pixels = np.stack([np.asarray(Image.open(samples / name).convert("L")) for name in SAMPLES])
    np.savez(tmp_path / "samples.npz", data=pixels, labels=np.array(list(SAMPLES.values())))
    labels = (WEIGHTS_DIR / "fashion_mnist" / "labels.txt").read_text().splitlines()
    for name, label in SAMPLES.items():
        folder = tmp_path / "folders" / labels[label]
        folder.mkdir(parents=True)
        Image.open(samples / name).save(folder / name)
    return tmp_path / "samples.npz", tmp_path / "folders"


def test_cli_evaluate_accuracy_and_agreement(sample_data, tmp_path, capsys):
    npz, folders = sample_data
    assert main(["evaluate", str(FASHION_MNIST_MODEL), str(npz), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 4 and result["top1_accuracy"] == 1.0
    quantized = tmp_path / "q.qcnn"
    assert main(["quantize", str(FASHION_MNIST_MODEL), "--no-ec", "--fc-k", "4", "--conv-k", "4", "--fast-kmeans",
                 "-o", str(quantized), "-q"]) == 0
    assert main(["evaluate", str(quantized), str(folders), "--reference", str(FASHION_MNIST_MODEL), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"top1_accuracy", "reference_top1_accuracy", "top1_agreement", "mean_kl"}
    assert result["reference_top1_accuracy"] == 1.0 and result["mean_kl"] > 0
    assert main(["evaluate", str(FASHION_MNIST_MODEL), str(npz), "--reference", str(FASHION_MNIST_MODEL), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "3 samples" in out and "top1 agreement               100.00%" in out


def test_cli_evaluate_errors(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), np.uint8))
    assert main(["evaluate", str(FASHION_MNIST_MODEL), str(tmp_path / "x.npy")]) == 1
    assert "no labels in the data" in capsys.readouterr().err
    assert main(["evaluate", str(FASHION_MNIST_MODEL), str(tmp_path / "nothing")]) == 1
    assert "nothing: no such file" in capsys.readouterr().err
