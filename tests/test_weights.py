"""Weights resolution: explicit file, weights folder, env var, Keras cache; clear errors, never silent random."""
from pathlib import Path

import pytest

from cxr_transfer.core.errors import CxrError, WeightsNotFoundError
from cxr_transfer.core.hashing import sha256_file
from cxr_transfer.extract.registry import get_backbone, parse_backbone_list
from cxr_transfer.extract.weights import (
    WEIGHTS_DIR_ENV,
    build_keras_backbone,
    resolve_weights,
)


@pytest.fixture
def fake_keras_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "keras-home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    return home


def test_explicit_file_wins_and_is_hashed(tmp_path: Path, fake_keras_home):
    path = tmp_path / "anything.h5"
    path.write_bytes(b"weights")
    source = resolve_weights(get_backbone("vgg16"), weights_file=path, weights_dir=tmp_path)
    assert source.kind == "file" and source.sha256 == sha256_file(path)


def test_directory_is_searched_by_architecture_name(tmp_path: Path, fake_keras_home, monkeypatch):
    for name in ("vgg16_imagenet_notop.weights.h5", "vgg19_other.h5", "xception_imagenet_notop_fp16.weights.h5",
                 "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", "readme.txt"):
        (tmp_path / name).write_bytes(name.encode())
    assert resolve_weights(get_backbone("vgg16"), weights_dir=tmp_path).path.name.startswith("vgg16_")
    assert resolve_weights(get_backbone("vgg19"), weights_dir=tmp_path).path.name == "vgg19_other.h5"
    assert resolve_weights(get_backbone("inceptionv3"), weights_dir=tmp_path).path.name.startswith("inception_v3")
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    assert resolve_weights(get_backbone("xception")).path.name.startswith("xception_")


def test_keras_cache_is_used_when_present(fake_keras_home):
    config = get_backbone("densenet201")
    cached = fake_keras_home / "models" / config.keras_weights_file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"keras file")
    source = resolve_weights(config)
    assert source.kind == "imagenet" and source.path == cached


def test_offline_without_a_file_names_the_file_and_where_to_put_it(tmp_path: Path, fake_keras_home, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise OSError("URL fetch failure: network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_weights(get_backbone("nasnetlarge"), weights_dir=tmp_path)
    message = str(error.value)
    assert "nasnetlarge_imagenet_notop.weights.h5" in message and str(tmp_path) in message
    assert "NASNet-large-no-top.h5" in message and "\n" not in message


def test_missing_paths_and_unknown_backbones(tmp_path: Path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(get_backbone("vgg16"), weights_file=tmp_path / "nope.h5")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        resolve_weights(get_backbone("vgg16"), weights_dir=tmp_path / "nope")
    with pytest.raises(CxrError, match="choose from: vgg16"):
        parse_backbone_list("vgg16,resnet9000")
    with pytest.raises(CxrError, match="below the architecture's minimum"):
        get_backbone("xception").input_size(32)


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    donor = build_keras_backbone(get_backbone("mobilenetv2"), 32, resolve_weights(get_backbone("mobilenetv2"),
                                                                                   random_weights=True))
    path = tmp_path / "vgg16_wrong.weights.h5"
    donor.save_weights(path)
    source = resolve_weights(get_backbone("vgg16"), weights_dir=tmp_path)
    with pytest.raises(CxrError, match="does not fit vgg16"):
        build_keras_backbone(get_backbone("vgg16"), 32, source)
