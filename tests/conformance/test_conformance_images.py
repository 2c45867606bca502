"""Image inputs: decoded (format and size read from the bytes), token cost counted as Step3-VL's
processor counts it. On real vLLM these run against the tiny Step-3.7 model (the tiny standard
model is text-only); its text is random, so there only shapes and token counts are asserted."""

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


@pytest.fixture(autouse=True)
def _multimodal(server: Server) -> None:
    if server.model_kind == "std":
        pytest.skip("the tiny standard model is text-only: images run on real-step")


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
    reply = ask(client, server, data_url(fmt, size), max_tokens=300 if server.simulated else 5)
    assert reply.usage.prompt_tokens > IMAGE_TOKENS[size]
    if server.simulated:
        assert f"a {fmt} image of {size[0]}x{size[1]} pixels" in reply.choices[0].message.content


# Tokens one image costs with Step-3.7 (Step3-VL's processor: a 728x728 view of 169 + 2 tokens,
# 504x504 crops of 81 + 2 tokens each, a newline token between crop rows; sides over 3024 px
# scaled down first; vllm/transformers_utils/processors/step3_vl.py, 0.23.0 and 0.32),
# measured as usage.prompt_tokens on real vLLM 0.32 with the tiny Step-3.7 model.
IMAGE_TOKENS = {
    (64, 48): 171,
    (64, 64): 171,
    (10, 20): 338,
    (33, 17): 337,
    (800, 600): 337,
    (2000, 1500): 1169,
    (3500, 3500): 3164,
    (728, 728): 504,
    (727, 400): 337,
    (1000, 200): 586,
    (1200, 300): 420,
    (30, 600): 171,
    (3100, 500): 752,
}


def test_images_cost_what_step3_vls_processor_counts(server: Server, client) -> None:
    def prompt_tokens(*sizes: tuple[int, int]) -> int:
        urls = [data_url("PNG", size) for size in sizes]
        return ask(client, server, *urls, max_tokens=1).usage.prompt_tokens

    base = prompt_tokens((64, 48)) - IMAGE_TOKENS[(64, 48)]
    for size, tokens in IMAGE_TOKENS.items():
        assert prompt_tokens(size) - base == tokens, size
    assert prompt_tokens((64, 64), (800, 600)) - base == 171 + 337


def test_broken_image_is_a_400(server: Server, client) -> None:
    junk = "data:image/png;base64," + base64.b64encode(b"this is not a picture").decode()
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, server, junk)
    assert err.value.status_code == 400
    assert "image" in err.value.message.lower()


def test_too_many_images_is_a_400(launch) -> None:
    # The simulators are started with a limit of 1; real-step's shared engine runs with 4.
    limit = 1 if launch.simulated else 4
    server = launch("--limit-mm-per-prompt", '{"image": 1}') if launch.simulated else launch()
    client = client_for(server)
    small = data_url("PNG", (8, 8))
    ask(client, server, *[small] * limit, max_tokens=5)
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, server, *[small] * (limit + 1))
    assert f"At most {limit} image(s) may be provided in one prompt." in err.value.message
