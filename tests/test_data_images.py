"""Image decoding and OFA's patch transform (torchvision numerics, without torchvision)."""
import base64

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import image_b64, make_image
from mue_fairseq.data import DataError, PatchTransform, decode_base64_image


def test_transform_matches_hand_computation():
    image = make_image(1, size=(5, 4))
    out = PatchTransform(5)(image.resize((5, 5), Image.BICUBIC))  # already 5x5: resize is a no-op
    pixels = np.asarray(image.resize((5, 5), Image.BICUBIC))  # (H, W, 3) uint8
    expected = (pixels.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 5)
    assert torch.equal(out, torch.from_numpy(expected.transpose(2, 0, 1).copy()))
    assert out.min() >= -1 and out.max() <= 1


def test_transform_resizes_bicubic_to_square():
    image = make_image(2, size=(13, 7))
    out = PatchTransform(6)(image)
    pixels = np.asarray(image.resize((6, 6), Image.BICUBIC)).astype(np.float32) / np.float32(255)
    assert out.shape == (3, 6, 6)
    assert torch.equal(out, torch.from_numpy(((pixels - 0.5) / 0.5).transpose(2, 0, 1).astype(np.float32)))


def test_imagenet_statistics():
    image = Image.new("RGB", (2, 2), (255, 0, 128))
    out = PatchTransform(2, imagenet_default_mean_and_std=True)(image)
    mean, std = np.float32([0.485, 0.456, 0.406]), np.float32([0.229, 0.224, 0.225])
    expected = (np.float32([255, 0, 128]) / np.float32(255) - mean) / std
    assert torch.equal(out[:, 0, 0], torch.from_numpy(expected))


def test_decode_urlsafe_and_standard_base64_grayscale_to_rgb():
    gray = Image.new("L", (3, 2), 77)
    urlsafe = image_b64(gray)
    standard = base64.b64encode(base64.urlsafe_b64decode(urlsafe)).decode()
    for data in (urlsafe, standard):
        image = decode_base64_image(data)
        assert image.mode == "RGB" and image.size == (3, 2)
        assert np.asarray(image)[0, 0].tolist() == [77, 77, 77]


@pytest.mark.parametrize("data,message", [
    ("abc", "corrupt base64"),
    ("", "empty image data"),
    (base64.urlsafe_b64encode(b"not an image at all").decode(), "cannot decode image"),
])
def test_bad_images_name_file_row_column(data, message):
    with pytest.raises(DataError, match=message) as err:
        decode_base64_image(data, path="f.tsv", row=7, column=2)
    assert (err.value.path, err.value.row, err.value.column) == ("f.tsv", 7, 2)
    assert str(err.value).startswith("f.tsv: row 7, column 2 (image):")
