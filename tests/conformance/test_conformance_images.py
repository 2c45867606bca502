"""Image inputs: decoded and described (format and size read from the bytes), token cost counted."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from conformance_servers import Server, client_for
from PIL import Image


def data_url(fmt: str, size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format=fmt)
    mime = {"JPEG": "jpeg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}[fmt]
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


def ask(client, server: Server, *urls: str, max_tokens: int = 300):
    parts = [{"type": "text", "text": "Describe the picture(s)."}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": parts}],
        reasoning_effort="low",
        max_tokens=max_tokens,
    )


@pytest.mark.parametrize(
    ("fmt", "size"),
    [("PNG", (64, 48)), ("JPEG", (800, 600)), ("GIF", (10, 20)), ("WEBP", (33, 17))],
)
def test_image_format_and_size_are_read(server: Server, client, fmt: str, size: tuple) -> None:
    reply = ask(client, server, data_url(fmt, size))
    assert reply.choices[0].message.content
    if server.simulated:
        assert f"a {fmt} image of {size[0]}x{size[1]} pixels" in reply.choices[0].message.content


def test_images_cost_prompt_tokens(server: Server, client) -> None:
    small = ask(client, server, data_url("PNG", (64, 64)), max_tokens=5).usage.prompt_tokens
    large = ask(client, server, data_url("PNG", (2000, 1500)), max_tokens=5).usage.prompt_tokens
    two = ask(client, server, data_url("PNG", (64, 64)), data_url("PNG", (64, 64)), max_tokens=5)
    assert large > small
    assert two.usage.prompt_tokens > small


def test_broken_image_is_a_400(server: Server, client) -> None:
    junk = "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, server, junk)
    assert err.value.status_code == 400
    assert "image" in err.value.message.lower()


def test_too_many_images_is_a_400(launch) -> None:
    server = launch("--limit-mm-per-prompt", '{"image": 1}')
    client = client_for(server)
    ask(client, server, data_url("PNG", (8, 8)), max_tokens=5)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, server, data_url("PNG", (8, 8)), data_url("PNG", (8, 8)))
    assert "At most 1 image(s) may be provided in one prompt." in err.value.message
