"""Reading a chat request the way vLLM's chat template sees it: text, images, tools, level.

Prompt tokens are counted on the rendered template text, plus each image's token cost, so
`usage.prompt_tokens`, `/tokenize` and the context-length check agree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from appliance.simulator.errors import ApiError, bad_request, validation_error
from appliance.simulator.generation import LEVELS, count_prompt_tokens
from appliance.simulator.images import ImageError, ImageInfo, decode_image_url

IMAGE_PLACEHOLDER = "<im_patch>"  # what Step-3.7's chat template writes for an image
LEVEL_WORDS = ", ".join(f"'{level}'" for level in LEVELS[:-1]) + f" or '{LEVELS[-1]}'"


@dataclass
class ChatPrompt:
    text: str
    images: list[ImageInfo] = field(default_factory=list)
    user_text: str = ""
    tool_result: str | None = None

    @property
    def text_without_images(self) -> str:
        """The prompt text with each image's placeholder taken out: vLLM replaces the
        placeholder with the image's tokens, which `ImageInfo.tokens` counts."""
        return self.text.replace(IMAGE_PLACEHOLDER, "")

    @property
    def tokens(self) -> int:
        return count_prompt_tokens(self.text_without_images) + sum(
            image.tokens for image in self.images
        )


def reasoning_level(body: dict[str, Any]) -> str | None:
    level = body.get("reasoning_effort")
    if level is None:
        kwargs = body.get("chat_template_kwargs") or {}
        level = kwargs.get("reasoning_effort") if isinstance(kwargs, dict) else None
    if level is None:
        return None
    if level not in LEVELS:
        raise validation_error(
            "reasoning_effort",
            f"Input should be {LEVEL_WORDS}",
            level,
            "literal_error",
            {"expected": LEVEL_WORDS},
        )
    return str(level)


def read_chat(body: dict[str, Any], level: str | None, image_limit: int | None) -> ChatPrompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise validation_error("messages", "Field required", body, "missing")
    prompt = ChatPrompt(text="")
    lines = [f"<|im_start|>system\nReasoning: {level}\n" if level else "<|im_start|>system\n"]
    tools = body.get("tools")
    if tools:
        lines.append("# Tools\n" + json.dumps(tools) + "\n")
    lines.append("<|im_end|>\n")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise validation_error("messages", "Field required", message, "missing")
        role = message["role"]
        # Any string is a role: vLLM's ChatCompletionMessageParam ends with
        # CustomChatCompletionMessageParam (`role: Required[str]`, vllm/entrypoints/chat_utils.py).
        if not isinstance(role, str):
            raise validation_error(
                "messages", "Input should be a valid string", role, "string_type"
            )
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise validation_error(
                "messages", "Input should be a valid string", name, "string_type"
            )
        text = _content_text(message.get("content"), prompt)
        for call in _tool_calls(message.get("tool_calls"), index):
            text += json.dumps(call["function"])
        lines.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
        if role == "user":
            prompt.user_text = text
        if role == "tool":
            prompt.tool_result = text
        elif role in ("user", "system"):
            prompt.tool_result = None
    lines.append("<|im_start|>assistant\n<think>\n")
    prompt.text = "".join(lines)
    if image_limit is not None and len(prompt.images) > image_limit:
        raise bad_request(
            f"At most {image_limit} image(s) may be provided in one prompt."
            " Set `--limit-mm-per-prompt` to increase this limit."
        )
    return prompt


def _tool_calls(calls: Any, index: int) -> list[dict[str, Any]]:
    where = ("messages", index, "tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise validation_error(where, "Input should be a valid list", calls, "list_type")
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise validation_error(where, "Field required", call, "missing")
    return calls


def _content_text(content: Any, prompt: ChatPrompt) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise validation_error("messages", "Input should be a valid list", content, "list_type")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            prompt.images.append(_image(url))
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise bad_request(f"Unknown part type: {kind}")
    return "\n".join(texts)


def _image(url: Any) -> ImageInfo:
    if not isinstance(url, str):
        raise bad_request("Invalid image_url: expected a string URL")
    try:
        return decode_image_url(url)
    except ImageError as err:
        raise ApiError(400, f"Failed to load image: {err}") from None
