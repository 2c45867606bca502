"""Image inputs: decode `data:` URLs and read format and size from the bytes (no Pillow).

Token cost follows the Step3-VL image processor that Step-3.7 uses (vLLM 0.23.0 and 0.32:
vllm/transformers_utils/processors/step3_vl.py, `Step3VLImageProcessor.get_num_image_tokens` and
`ImagePatcher`): the whole image as one 728x728 view of 169 tokens plus its 2 delimiters; if its
long side reaches 728 px (or it is lopsided, over 1.5:1), 504x504 crops of 81 tokens plus 2
delimiters each, and one newline token between rows of crops. Measured on real vLLM 0.32 with the
tiny Step-3.7 model: 64x48 -> 171, 800x600 -> 337, 2000x1500 -> 1169, 3500x3500 -> 3164.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass

MAX_SIDE = 3024  # longer sides are scaled down to this first
GLOBAL_TOKENS = 169 + 2  # the 728x728 view and its start/end tokens
CROP_SIDE = 504
CROP_TOKENS = 81 + 2
GLOBAL_SIDE = 728


class ImageError(ValueError):
    """The image data cannot be decoded."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # PNG, JPEG, GIF, WEBP
    width: int
    height: int
    size_bytes: int

    @property
    def tokens(self) -> int:
        crops, rows = crop_grid(self.width, self.height)
        return GLOBAL_TOKENS + CROP_TOKENS * crops + max(0, rows - 1)

    def describe(self) -> str:
        size = f"{self.width}x{self.height} pixels"
        return f"a {self.format} image of {size} ({self.size_bytes} bytes)"


def crop_grid(width: int, height: int) -> tuple[int, int]:
    """(number of crops, rows of crops) the Step3-VL patcher cuts an image into."""
    long, short = max(width, height), min(width, height)
    if short < 32 and long > 4 * short:  # a sliver is padded to a square first
        width = height = long
    if max(width, height) > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)
        width, height = int(width * scale), int(height * scale)
    long, short = max(width, height), min(width, height)
    if long < GLOBAL_SIDE:
        window = short if long / short > 1.5 else 0
    else:
        window = min(short, CROP_SIDE) if long / short > 4 else CROP_SIDE
    if window == 0:
        return 0, 0
    columns = _windows(_crop_extent(width, window), window)
    rows = _windows(_crop_extent(height, window), window)
    return columns * rows, rows


def _crop_extent(side: int, window: int) -> int:
    """The side is resized to whole windows, rounding up only past 0.2 of a window."""
    if side < window:
        return side
    whole, rest = divmod(side / window, 1)
    return window * (int(whole) + (1 if rest > 0.2 else 0))


def _windows(side: int, window: int) -> int:
    return 1 if side <= window else math.ceil((side - window) / window + 1)


def decode_image_url(url: str) -> ImageInfo:
    """Decode a `data:image/...;base64,` URL; anything else cannot be fetched here."""
    if not url.startswith("data:"):
        if url.startswith(("http://", "https://")):
            raise ImageError(f"Failed to fetch image from {url[:80]}: network access is disabled")
        raise ImageError("Invalid image URL: expected a data URL or an http(s) URL")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ImageError("Invalid image data URL: only base64-encoded data is supported")
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"Failed to decode base64 image data: {err}") from None
    return read_image(data)


def read_image(data: bytes) -> ImageInfo:
    """Format and size from the file header; raises ImageError like PIL's UnidentifiedImageError."""
    try:
        fmt, width, height = _sniff(data)
    except (struct.error, IndexError):
        fmt, width, height = "", 0, 0
    if not fmt or width <= 0 or height <= 0:
        raise ImageError("cannot identify image file <_io.BytesIO object>")
    return ImageInfo(fmt, width, height, len(data))


def _sniff(data: bytes) -> tuple[str, int, int]:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", width, height
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", data[6:10])
        return "GIF", width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    return "", 0, 0


def _webp(data: bytes) -> tuple[str, int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return "WEBP", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return "WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return "WEBP", width, height
    return "", 0, 0


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: bytes) -> tuple[str, int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return "", 0, 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return "JPEG", width, height
        pos += 2 + length
    return "", 0, 0
