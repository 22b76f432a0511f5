"""Strict decoding of untrusted image bytes (an HTTP upload) with byte and pixel limits.

Every failure raises :class:`ImageInputError` with the HTTP status it deserves and a reason:

- 413 ``too_large``: more bytes than ``max_bytes``, or a header announcing more pixels than ``max_pixels``
  (a decompression bomb is refused from its header, before anything is decoded);
- 415 ``unsupported_type``: a declared media type or actual bytes that are not PNG or JPEG;
- 400 ``corrupt``: empty, truncated or undecodable bytes, or a header whose size is impossible.

Grayscale, palette, RGBA and 16-bit images are converted to 8-bit RGB (alpha dropped, 16 bits scaled to 8), not
rejected. JPEG EXIF orientation is ignored, as the dataset reader (:func:`labelshift.data.io.read_image`) ignores
it, so a served mask has the stored image's size.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

MEDIA_TYPES = {"image/png": "png", "image/jpeg": "jpeg"}  # what the server accepts, by declared type
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_OTHER_SIGNATURES = {b"GIF87a": "gif", b"GIF89a": "gif", b"BM": "bmp", b"II*\x00": "tiff", b"MM\x00*": "tiff",
                     b"RIFF": "riff (webp?)", b"%PDF": "pdf"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length field


class ImageInputError(ValueError):
    """Bad image input; ``status`` is the HTTP status (400, 413, 415), ``reason`` a short code."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


@dataclass(frozen=True)
class ImageLimits:
    """``max_bytes`` of an encoded image; ``max_pixels`` (width × height) of a decoded one."""

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = 4096 * 2048

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"image limits must be positive, got {self}")


def media_format(content_type: str | None) -> str:
    """``png`` | ``jpeg`` for a declared media type (parameters such as ``; charset`` ignored), else 415."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise ImageInputError(415, "unsupported_type", f"unsupported content type {media or '(none)'!r}; send "
                                                       f"one of {sorted(MEDIA_TYPES)} (or multipart/form-data)")
    return MEDIA_TYPES[media]


def sniff_format(data: bytes) -> str:
    """The format the bytes themselves carry: ``png`` | ``jpeg``; other known formats 415, unknown ones 400."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    for signature, name in _OTHER_SIGNATURES.items():
        if data.startswith(signature):
            raise ImageInputError(415, "unsupported_type", f"the bytes are a {name} image; send PNG or JPEG")
    raise ImageInputError(400, "corrupt", "the bytes are not an image (no PNG or JPEG signature)")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageInputError(400, "corrupt", "truncated PNG: no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ImageInputError(400, "corrupt", f"corrupt JPEG: no marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _JPEG_SOF:
            if position + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        if marker == 0xDA or length < 2:  # scan data before any frame header, or a broken length
            break
        position += 2 + length
    raise ImageInputError(400, "corrupt", "truncated or corrupt JPEG: no frame header (SOF) found")


def header_size(data: bytes, image_format: str) -> tuple[int, int]:
    """(width, height) read from the PNG IHDR or the JPEG frame header, without decoding pixels."""
    return _png_size(data) if image_format == "png" else _jpeg_size(data)


def check_header(data: bytes, limits: ImageLimits, declared: str | None = None) -> tuple[str, int, int]:
    """Format and size of encoded ``data`` checked against ``limits`` (and the ``declared`` format, if any)
    before decoding: returns (format, width, height)."""
    if len(data) > limits.max_bytes:
        raise ImageInputError(413, "too_large", f"{len(data)} bytes; the limit is {limits.max_bytes} bytes")
    if not data:
        raise ImageInputError(400, "corrupt", "empty body: no image bytes")
    image_format = sniff_format(data)
    if declared is not None and declared != image_format:
        raise ImageInputError(415, "unsupported_type", f"declared {declared} but the bytes are {image_format}")
    width, height = header_size(data, image_format)
    if width < 1 or height < 1:
        raise ImageInputError(400, "corrupt", f"the header gives an empty image ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageInputError(413, "too_large", f"{width}x{height} = {width * height} pixels; the limit is "
                                                f"{limits.max_pixels} pixels")
    return image_format, width, height


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), declared: str | None = None) -> np.ndarray:
    """Untrusted PNG/JPEG bytes -> (H, W, 3) uint8 RGB, the array :func:`labelshift.data.io.read_image` gives
    for the same file (grayscale, palette, alpha and 16-bit images converted to 8-bit RGB).

    ``declared``: the format the client declared (``png`` | ``jpeg``), checked against the bytes.
    """
    image_format, width, height = check_header(data, limits, declared)
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if decoded is None:
        raise ImageInputError(400, "corrupt", f"cannot decode the {image_format.upper()} image: truncated or corrupt")
    if decoded.shape[:2] != (height, width):
        raise ImageInputError(400, "corrupt", f"the {image_format.upper()} header says {width}x{height} but the "
                                              f"pixels are {decoded.shape[1]}x{decoded.shape[0]}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
