"""Decoding OFA's base64 image column and the patch-image transform, without torchvision.

OFA decodes ``Image.open(BytesIO(base64.urlsafe_b64decode(s)))`` (which accepts both the
URL-safe and the standard alphabet) and transforms with torchvision's
``Compose([convert("RGB"), Resize((S, S), BICUBIC), ToTensor(), Normalize(mean, std)])``.
:class:`PatchTransform` reproduces that bit for bit: torchvision's Resize on a PIL image is
``img.resize((S, S), BICUBIC)``, ToTensor is ``uint8 → float32 / 255`` in CHW order and
Normalize is ``(x - mean) / std`` in float32.

Like OFA, this module lets PIL load truncated files and lifts PIL's decompression-bomb
limit (both are PIL globals, set on import).
"""
import base64
import binascii
import io
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile

from .errors import DataError

ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None
warnings.filterwarnings("ignore", "(Possibly )?corrupt EXIF data", UserWarning)

OFA_MEAN = (0.5, 0.5, 0.5)
OFA_STD = (0.5, 0.5, 0.5)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def decode_base64_image(
    data: str,
    path: Optional[str] = None,
    row: Optional[int] = None,
    column: Optional[int] = None,
) -> Image.Image:
    """OFA's base64 image column → fully loaded RGB PIL image.

    Corrupt base64 or bytes PIL cannot decode raise :class:`DataError` located at
    ``path``/``row``/``column``.
    """

    def fail(message):
        return DataError(message, path=path, row=row, column=column, field="image")

    try:
        raw = base64.urlsafe_b64decode(data)
    except (binascii.Error, ValueError) as e:
        raise fail(f"corrupt base64 image data ({e})") from None
    if not raw:
        raise fail("empty image data")
    try:
        image = Image.open(io.BytesIO(raw))
        return image.convert("RGB")  # convert() loads the pixels, so decode errors surface here
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise fail(f"cannot decode image ({type(e).__name__}: {e})") from None


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` for an RGB PIL image: (3, H, W) float32 in [0, 1]."""
    array = np.array(image.convert("RGB"), dtype=np.uint8, copy=True)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32).div(255)


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision ``Normalize``: ``(x - mean) / std`` per channel of a (3, H, W) tensor."""
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return tensor.sub(mean_t).div(std_t)


class PatchTransform:
    """OFA's patch-image transform: PIL image → (3, size, size) float32 tensor.

    ``imagenet_default_mean_and_std`` selects ImageNet statistics instead of OFA's 0.5/0.5
    (the task option of the same name).
    """

    def __init__(self, size: int, imagenet_default_mean_and_std: bool = False):
        self.size = int(size)
        if imagenet_default_mean_and_std:
            self.mean, self.std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        else:
            self.mean, self.std = OFA_MEAN, OFA_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        return normalize(image_to_tensor(image), self.mean, self.std)

    def __repr__(self):
        return f"PatchTransform(size={self.size}, mean={self.mean}, std={self.std})"
