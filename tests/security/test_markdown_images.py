"""Remote images in replies (issue 12, item 8): the text the chat shows loads nothing by itself.

`ui.chat_render.block_remote_images` against the ways a reply can smuggle an image or a fetching
tag into the page. The attack in the browser (a reply with remote images, a listener on loopback
that must see nothing, the page's CSP) is tests/browser/test_private_files_and_images.py.
"""

from __future__ import annotations

import pytest

from ui.chat_render import block_remote_images


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("`![x](http://h/a)`", "`![x](http://h/a)`"),  # code shows as text: left alone
        ("```\n![x](http://h/a)\n```\n", "```\n![x](http://h/a)\n```\n"),
        ("![ok](data:image/png;base64,iVBO)", "![ok](data:image/png;base64,iVBO)"),
        ("a<br>b **c** <https://h/link>", "a<br>b **c** <https://h/link>"),
    ],
)
def test_what_loads_nothing_is_left_as_it_is(text: str, kept: str) -> None:
    assert block_remote_images(text) == kept


@pytest.mark.parametrize(
    "text",
    [
        "![x](http://h/a)",
        "![x](<http://h/a>)",
        "![x][r]\n\n[r]: http://h/a",
        "![r][]\n\n[r]: http://h/a",
        "![r]\n\n[r]: http://h/a",
        "![a ![n](http://h/n)](http://h/a)",
        "\\`![x](http://h/a)`",  # an escaped backtick opens no code span
        "``` x`y\n![x](http://h/a)\n```",  # nor does a fence whose info string has a backtick
        "![unclosed](http://h/a",
        '<img src="http://h/a">',
        "<IMG SRC=http://h/a>",
        '<p style="background:url(http://h/a)">x</p>',
        '<video poster="http://h/a"></video>',
        '<picture><source srcset="http://h/a"></picture>',
        '<svg><image href="http://h/a"/></svg>',
        "<style>@import url(http://h/a)</style>",
        "a ` b\n\n![x](http://h/a)\n\nc ` d",  # no code span across paragraphs
    ],
)
def test_no_image_or_tag_that_fetches_survives(text: str) -> None:
    out = block_remote_images(text)
    assert "![" not in out.replace("\\![", "")
    for tag in ("img", "video", "source", "image", "style", "p style"):
        assert f"<{tag}" not in out.lower()


def test_no_tag_starts_an_html_block_that_would_swallow_a_code_fence() -> None:
    # `<div>` on its own line starts an HTML block: the browser would take the fence and the
    # `<img>` inside it as raw HTML. Escaped, the fence is a fence and the tag shows as code.
    text = "<div>\n```\n<img src=http://h/a>\n```\n</div>"
    assert block_remote_images(text) == "&lt;div>\n```\n<img src=http://h/a>\n```\n&lt;/div>"
    assert block_remote_images("a<br>b\n<br>") == "a<br>b\n&lt;br>"
