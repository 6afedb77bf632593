"""The ``qcnn`` command line: convert, info, classify; exit codes and error lines."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import qcnn
from qcnn.cli import main
from qcnn.io.caffe import save_caffemodel

TINY = """
name: "tiny"
input: "data" input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


@pytest.fixture
def caffe_files(tmp_path):
    prototxt = tmp_path / "tiny.prototxt"
    prototxt.write_text(TINY)
    caffemodel = tmp_path / "tiny.caffemodel"
    save_caffemodel(qcnn.load_caffe(prototxt, fold_batchnorm=False, seed=1), caffemodel)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    return prototxt, caffemodel, labels


@pytest.fixture
def model(caffe_files, tmp_path):
    prototxt, caffemodel, labels = caffe_files
    out = tmp_path / "tiny.qcnn"
    assert main(["convert", str(prototxt), str(caffemodel), "-o", str(out), "--mean", "100,110,120",
                 "--scale", "0.02", "--labels", str(labels), "--resize", "20", "-q"]) == 0
    return out


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "P"]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).convert(mode).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.arm
def test_convert_stores_preprocessing_and_labels(model):
    net = qcnn.load(model)
    assert net.metadata["labels"] == ["cat", "dog", "bird"]
    assert net.metadata["preprocess"] == {"channel_order": "BGR", "mean": [100.0, 110.0, 120.0],
                                          "scale": 0.02, "resize": 20}
    assert [layer.type for layer in net.layers] == ["Convolution", "ReLU", "Pooling", "InnerProduct", "Softmax"]


@pytest.mark.arm
def test_classify_json_matches_the_python_api(model, images, capsys):
    assert main(["classify", *images, "--model", str(model), "--top", "2", "--json", "--batch-size", "3"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in document["results"]] == images
    net = qcnn.load(model)
    from qcnn.io.image import load_images
    probs = net.forward(load_images(images, (3, 16, 16), net.metadata["preprocess"]))["prob"]
    for result, p in zip(document["results"], probs):
        top = result["top"]
        assert len(top) == 2 and [t["index"] for t in top] == list(np.argsort(-p)[:2])
        assert top[0]["label"] == ["cat", "dog", "bird"][top[0]["index"]]
        assert top[0]["probability"] == pytest.approx(float(p.max()), rel=1e-6)


@pytest.mark.arm
def test_classify_table_and_info(model, images, capsys):
    assert main(["classify", images[0], "--model", str(model), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert images[0] in out and all(name in out for name in ("cat", "dog", "bird"))
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out
    assert "conv" in out and "InnerProduct" in out and "total" in out
    assert main(["info", str(model), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total"]["macs"] == 4 * 27 * 7 * 7 + 4 * 3
    assert info["total"]["params"] == 4 * 27 + 4 + 4 * 3 + 3


@pytest.mark.arm
def test_info_on_a_prototxt(caffe_files, capsys):
    prototxt, caffemodel, _ = caffe_files
    assert main(["info", str(prototxt), "--weights", str(caffemodel), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == ["prob"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "qcnn.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_failure(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcnn: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_errors_are_one_line_and_leave_no_file(caffe_files, model, images, tmp_path):
    prototxt, caffemodel, _ = caffe_files
    out = tmp_path / "out.qcnn"
    truncated = tmp_path / "truncated.caffemodel"
    truncated.write_bytes(caffemodel.read_bytes()[:-50])
    corrupt = tmp_path / "corrupt.caffemodel"
    corrupt.write_bytes(b"\xff\xff\xff" + caffemodel.read_bytes()[3:])
    bad_proto = tmp_path / "bad.prototxt"
    bad_proto.write_text(TINY.replace('top: "fc" inner', 'top "fc" inner'))
    wrong_shape = tmp_path / "wrong.prototxt"
    wrong_shape.write_text(TINY.replace("num_output: 4", "num_output: 5"))
    unknown = tmp_path / "unknown.prototxt"
    unknown.write_text(TINY.replace('type: "ReLU"', 'type: "Swish"'))
    cases = [
        ((prototxt, truncated), (str(truncated),)),
        ((prototxt, corrupt), (str(corrupt), "not a valid caffemodel")),
        ((bad_proto, caffemodel), (str(bad_proto), "expected ':' or '{'")),
        ((wrong_shape, caffemodel), (str(caffemodel), "layer 'conv'", "(4, 3, 3, 3)")),
        ((unknown, caffemodel), (str(unknown), "layer 'relu'", "Swish")),
        ((tmp_path / "missing.prototxt", caffemodel), ("missing.prototxt", "no such file")),
        ((prototxt, tmp_path / "missing.caffemodel"), ("missing.caffemodel", "no such file")),
    ]
    for files, needles in cases:
        assert_one_line_failure(run_cli("convert", *files, "-o", out), *needles)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    # A failed convert never damages an existing output.
    out.write_bytes(b"precious")
    assert_one_line_failure(run_cli("convert", prototxt, truncated, "-o", out))
    assert out.read_bytes() == b"precious"

    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    assert_one_line_failure(run_cli("classify", text_file, "--model", model), str(text_file), "not an image")
    assert_one_line_failure(run_cli("classify", tmp_path / "nope.jpg", "--model", model), "nope.jpg")
    assert_one_line_failure(run_cli("classify", images[0], "--model", tmp_path / "nope.qcnn"), "nope.qcnn")
    (tmp_path / "empty").mkdir()
    assert_one_line_failure(run_cli("classify", tmp_path / "empty", "--model", model), "empty", "no image files")
    assert_one_line_failure(run_cli("info", text_file), str(text_file))
    labels = tmp_path / "two.txt"
    labels.write_text("a\nb\n")
    assert_one_line_failure(run_cli("classify", images[0], "--model", model, "--labels", labels),
                            "2 labels for 3 classes")


@pytest.mark.arm
def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("convert", "info", "classify"):
        assert command in result.stdout


@pytest.mark.arm
def test_bundled_fashion_mnist_model_classifies_its_samples(capsys):
    from qcnn import resources
    samples = sorted((resources.WEIGHTS_DIR / "samples").glob("fashion_*.png"))
    assert len(samples) >= 4
    assert main(["classify", *map(str, samples), "--model", str(resources.FASHION_MNIST_MODEL), "--top", "1",
                 "--json"]) == 0
    for result in json.loads(capsys.readouterr().out)["results"]:
        expected = result["image"].rsplit("fashion_", 1)[1][:-4].replace("_", " ")
        assert result["top"][0]["label"].lower().replace("-", " ") == expected
        assert result["top"][0]["probability"] > 0.9


@pytest.mark.arm
def test_default_model_names_the_sample_photos(capsys):
    """The bundled compressed EfficientNet-Lite0 on the bundled photos (scikit-image's coffee and
    chelsea), as the README's first command runs it, and on a folder of them."""
    from qcnn import resources
    assert resources.DEFAULT_MODEL == resources.EFFICIENTNET_LITE0_PQ
    assert main(["classify"]) == 0  # no arguments: the bundled sample photo, a cup of espresso
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["image", "rank", "probability", "class"]
    assert out[1].startswith(str(resources.SAMPLE_IMAGE)) and out[1].endswith("espresso (967)")
    assert len(out) == 1 + 5 + 1 and out[-1].startswith("1 image in ")
    assert main(["classify", str(resources.WEIGHTS_DIR / "samples"), "--top", "1", "--json"]) == 0
    results = {r["image"].rsplit("/", 1)[1]: r["top"][0] for r in json.loads(capsys.readouterr().out)["results"]}
    assert results["coffee.jpg"]["label"] == "espresso" and results["coffee.jpg"]["probability"] > 0.9
    assert results["chelsea.jpg"]["index"] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat: close calls
    assert len(results) == len(list((resources.WEIGHTS_DIR / "samples").iterdir()))
