"""Image checks before anything is sent: real bytes, size, count, the 3024 px side limit."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from appliance.chat import client as chat
from appliance.errors import BadInputError


def make_image(path: Path, size: tuple[int, int], fmt: str = "PNG", color: str = "red") -> Path:
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_a_real_png_is_sent_as_is(tmp_path: Path) -> None:
    path = make_image(tmp_path / "cat.png", (640, 480))
    image = chat.prepare_image(path, max_mb=20)
    assert (image.mime, image.width, image.height, image.scaled) == ("image/png", 640, 480, False)
    assert image.data == path.read_bytes()
    assert image.data_url() == "data:image/png;base64," + base64.b64encode(image.data).decode()


@pytest.mark.parametrize(
    ("fmt", "mime"), [("JPEG", "image/jpeg"), ("GIF", "image/gif"), ("WEBP", "image/webp")]
)
def test_other_formats_keep_their_type(tmp_path: Path, fmt: str, mime: str) -> None:
    path = make_image(tmp_path / "x.img", (32, 32), fmt)
    assert chat.prepare_image(path, max_mb=20).mime == mime


def test_bmp_is_reencoded_as_png(tmp_path: Path) -> None:
    path = make_image(tmp_path / "x.bmp", (20, 10), "BMP")
    image = chat.prepare_image(path, max_mb=20)
    assert image.mime == "image/png"
    assert Image.open(io.BytesIO(image.data)).size == (20, 10)


def test_a_text_file_named_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n" * 100)
    with pytest.raises(BadInputError, match=r"notes\.png is not an image.*Nothing was sent"):
        chat.prepare_image(path, max_mb=20)


def test_a_truncated_png_is_refused(tmp_path: Path) -> None:
    full = make_image(tmp_path / "full.png", (400, 400), color="blue").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadInputError, match=r"cut\.png looks like a PNG file but cannot be"):
        chat.prepare_image(path, max_mb=20)


def test_too_big_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    with path.open("wb") as handle:  # sparse: the size check must not need the bytes
        handle.truncate(50 * 1024 * 1024)
    with pytest.raises(
        BadInputError, match=r"huge\.png is 50\.0 MiB; images may be at most 20\.0 MiB"
    ):
        chat.prepare_image(path, max_mb=20)


def test_sides_over_3024_are_scaled_down_keeping_the_aspect(tmp_path: Path) -> None:
    path = make_image(tmp_path / "wide.png", (6048, 1000))
    image = chat.prepare_image(path, max_mb=20)
    assert image.scaled
    assert (image.width, image.height) == (3024, 500)
    assert (image.original_width, image.original_height) == (6048, 1000)
    assert Image.open(io.BytesIO(image.data)).size == (3024, 500)


def test_a_large_jpeg_stays_jpeg_when_scaled(tmp_path: Path) -> None:
    path = make_image(tmp_path / "tall.jpg", (1000, 4000), "JPEG")
    image = chat.prepare_image(path, max_mb=20)
    assert (image.mime, image.width, image.height) == ("image/jpeg", 756, 3024)


def test_count_limit_checked_first_and_counts_earlier_images(tmp_path: Path) -> None:
    missing = [tmp_path / f"{i}.png" for i in range(20)]  # never read: the count fails first
    with pytest.raises(BadInputError, match=r"Too many images: 20 attached; .* at most 8"):
        chat.prepare_images(missing, max_mb=20, max_count=8)
    two = [make_image(tmp_path / f"ok{i}.png", (8, 8)) for i in range(2)]
    with pytest.raises(BadInputError, match=r"2 in this message and 7 earlier"):
        chat.prepare_images(two, max_mb=20, max_count=8, already_in_conversation=7)
    assert len(chat.prepare_images(two, max_mb=20, max_count=8, already_in_conversation=6)) == 2


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="could not be read"):
        chat.prepare_image(tmp_path / "gone.png", max_mb=20)
