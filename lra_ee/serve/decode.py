"""Request bodies -> model inputs: decode a JPEG/PNG/WebP file and preprocess it for the model.

Each request is decoded and preprocessed on its own (open_clip's eval transform, built from the
model's saved ``preprocess_cfg``), before batching: a corrupt body raises ``BadImage`` (answered
``400 {"error": ...}``) and never reaches a batch.
"""

from __future__ import annotations

import io
from typing import Callable

import torch

from ..data import preprocess_from_cfg
from ..errors import UserError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_PIXELS = 64_000_000  # decoded size limit (a small compressed file can expand to gigabytes)


class BadImage(UserError, ValueError):
    """The request body is not an image this server can read (answered with HTTP 400)."""


build_transform = preprocess_from_cfg  # open_clip's eval transform for a saved preprocess_cfg


def _sniff_format(body: bytes) -> str | None:
    if body.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if body[:4] == b"RIFF" and body[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(body: bytes):
    """Decode a JPEG/PNG/WebP body into a PIL image (fully loaded); :class:`BadImage` otherwise.

    The image keeps its mode (RGBA, L, P, CMYK, I;16, ...): open_clip's transform resizes first
    and converts to RGB afterwards, and so do we.
    """
    from PIL import Image, UnidentifiedImageError

    if not body:
        raise BadImage("empty request body: send a JPEG, PNG or WebP image file as the body")
    try:
        image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        fmt = _sniff_format(body)
        if fmt:
            raise BadImage(f"corrupt or truncated {fmt} image: PIL cannot identify it") from None
        raise BadImage("the request body is not a JPEG, PNG or WebP image") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(f"cannot read the image: {err}") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise BadImage(f"image of {width} x {height} pixels is outside 1..{MAX_PIXELS} pixels")
    try:
        image.load()
    except Exception as err:  # truncated or corrupt data: PIL raises OSError/SyntaxError/ValueError/...
        raise BadImage(f"corrupt {image.format} image: {err}") from None
    return image


def preprocess_body(body: bytes, transform: Callable) -> torch.Tensor:
    """Request body -> ``[3, H, W]`` fp32 through ``transform``; :class:`BadImage` if unreadable."""
    image = decode_image(body)
    try:
        x = transform(image)
    except Exception as err:  # an image PIL opened but cannot convert/resize
        raise BadImage(f"cannot preprocess the {image.format} image (mode {image.mode}): {err}") from None
    if not torch.isfinite(x).all():
        raise BadImage("the image gives non-finite pixel values after preprocessing")
    return x
