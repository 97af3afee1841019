"""The anthropic provider against a local server that refuses what the Messages API refuses:
a final assistant turn (a prefill) ending in whitespace, empty messages or text blocks, a turn
whose text is only whitespace, a system prompt or a tool result that is empty or only
whitespace, no messages at all, and an inline image whose media_type is not one of the four
it takes or not what its bytes are. What the client sees when a stream continues on Claude
(on_midstream = "continue"), and conversations with empty or blank messages, which OpenAI
takes and Claude refused as a 400.

    https://docs.anthropic.com/en/api/messages
    https://docs.anthropic.com/en/docs/build-with-claude/prompt-engineering/prefill-claudes-response
    https://docs.anthropic.com/en/docs/build-with-claude/streaming
    https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import msgspec
import pytest
from helpers import LocalHTTPServer, config, serving

from schemas import ChatMessage, CompletionRequest, ProviderOk, ProviderRequest
from schemas.streaming import Assembler
from schemas.wire import ImagePart, TextPart, ToolCall
from service.client import stream
from workers import anthropic
from workers.anthropic import AnthropicProvider, AnthropicSettings
from workers.base import ProviderError

KEY = "sk-ant-api03-strict-Qm3vT8xK1pZ6"
MODEL = "claude-sonnet-4-20250514"
# A 1x1 PNG, base64.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)


class Claude(LocalHTTPServer):
    """Answers each POST with `pieces` (streamed as text deltas, or joined whole), unless the
    body is one the Messages API refuses; keeps every body it was sent."""

    def __init__(self) -> None:
        super().__init__(_Handler)
        self.pieces: list[str] = ["Hi."]
        self.bodies: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def refusal(body: dict[str, Any]) -> str | None:
    """What the API says of `body`, as its invalid_request_error, or None."""
    return system_refusal(body.get("system")) or messages_refusal(body["messages"])


def system_refusal(system: str | list[dict[str, Any]] | None) -> str | None:
    """Each text block of the system prompt (a string is one) must have text that is not only
    whitespace, even beside others that have: a "\n\n" block between two instructions is
    refused (https://github.com/agentjido/req_llm/issues/711), as is a system prompt of a space
    (https://github.com/BoltAI/BoltAI/issues/165)."""
    if system is None:
        return None
    blocks = [{"type": "text", "text": system}] if isinstance(system, str) else system
    texts = [b["text"] for b in blocks if b["type"] == "text"]
    if not all(texts):
        return "system: text content blocks must be non-empty"
    if not all(t.strip() for t in texts):
        return "system: text content blocks must contain non-whitespace text"
    return None


def tool_result_refusal(block: dict[str, Any]) -> str | None:
    """A tool_result may leave its content out (the documented empty result); given, the
    content is text blocks (a string is one) held to a turn's rules: an empty or blank string
    is refused (https://github.com/zed-industries/zed/pull/27130,
    https://github.com/NousResearch/hermes-agent/pull/97641)."""
    if "content" not in block:
        return None
    content = block["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    texts = [b["text"] for b in blocks if b["type"] == "text"]
    if not all(texts):
        return "messages: text content blocks must be non-empty"
    if texts and not any(t.strip() for t in texts):
        return "messages: text content blocks must contain non-whitespace text"
    return None


# The image types the API takes, by the bytes each begins with (WebP: RIFF, then WEBP at 8).
IMAGE_TYPES = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"RIFF": "image/webp",
}


def image_refusal(source: dict[str, Any]) -> str | None:
    """A base64 source's media_type is one of the four the API takes, and what its bytes are
    (https://github.com/BerriAI/litellm/issues/24900,
    https://github.com/BoundaryML/baml/issues/1292)."""
    if source["type"] != "base64":
        return None
    declared = source["media_type"]
    if declared not in IMAGE_TYPES.values():
        return (
            "image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
            "'image/gif' or 'image/webp'"
        )
    head = base64.b64decode(source["data"])[:12]
    actual = next((t for magic, t in IMAGE_TYPES.items() if head.startswith(magic)), None)
    if actual is not None and actual != declared:
        return (
            f"image.source.base64: The image was specified using the {declared} media type, "
            f"but the image appears to be a {actual} image"
        )
    return None


def images_of(blocks: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for block in blocks:
        if block["type"] == "image":
            yield block["source"]
        elif block["type"] == "tool_result" and isinstance(block.get("content"), list):
            yield from images_of(block["content"])


def messages_refusal(messages: list[dict[str, Any]]) -> str | None:
    if not messages:
        return "messages: at least one message is required"
    for i, turn in enumerate(messages):
        content = turn["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if isinstance(content, list) and any(b["type"] == "text" and not b["text"] for b in blocks):
            return "messages: text content blocks must be non-empty"
        final_assistant = i == len(messages) - 1 and turn["role"] == "assistant"
        if not content and not final_assistant:
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        # Whitespace beside other text is taken; a turn whose text is only whitespace is not
        # (the API's answers to each shape: https://github.com/LibreChat-AI/agents/pull/124).
        texts = [b["text"] for b in blocks if b["type"] == "text"]
        if texts and not any(t.strip() for t in texts) and not final_assistant:
            return "messages: text content blocks must contain non-whitespace text"
        last = blocks[-1] if final_assistant and blocks else {"type": None}
        if last["type"] == "text" and last["text"] != last["text"].rstrip():
            return "messages: final assistant content cannot end with trailing whitespace"
        for block in blocks:
            refused = tool_result_refusal(block) if block["type"] == "tool_result" else None
            if refused is not None:
                return refused
        for source in images_of(blocks):
            refused = image_refusal(source)
            if refused is not None:
                return f"messages.{i}.content: {refused}"
    return None


def sse(data: dict[str, Any]) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def events(pieces: list[str]) -> list[dict[str, Any]]:
    """The documented stream of a text answer given in `pieces`."""
    message = {"id": "msg_01", "type": "message", "role": "assistant", "model": MODEL}
    message |= {"content": [], "stop_reason": None, "usage": {"input_tokens": 12}}
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        *(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}
            for t in pieces
        ),
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 3},
        },
        {"type": "message_stop"},
    ]


class _Handler(BaseHTTPRequestHandler):
    server: Claude

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.bodies.append(body)
        refused = refusal(body)
        if refused is not None:
            error = {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": refused},
            }
            self._send(400, "application/json", json.dumps(error).encode())
        elif body.get("stream"):
            data = b"".join(sse(event) for event in events(self.server.pieces))
            self._send(200, "text/event-stream", data)
        else:
            text = "".join(self.server.pieces)
            message = {"id": "msg_01", "type": "message", "role": "assistant", "model": MODEL}
            message |= {"content": [{"type": "text", "text": text}], "stop_reason": "end_turn"}
            message["usage"] = {"input_tokens": 12, "output_tokens": 3}
            self._send(200, "application/json", json.dumps(message).encode())

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def claude() -> Iterator[Claude]:
    with serving(Claude()) as server:
        yield server


@pytest.fixture
async def provider(claude: Claude) -> Any:
    settings = {"kind": "anthropic", "model": MODEL, "base_url": claude.url}
    made = AnthropicProvider(
        msgspec.convert(settings, AnthropicSettings), environ={"ANTHROPIC_API_KEY": KEY}
    )
    yield made
    await made.aclose()


def chat(*messages: ChatMessage) -> ProviderRequest:
    return ProviderRequest(id="r1", messages=list(messages))


async def streamed(provider: AnthropicProvider, request: ProviderRequest) -> list[str]:
    items = [item async for item in provider.stream(request, timeout_s=5)]
    assert isinstance(items[-1], ProviderOk), items[-1]
    return [item for item in items if isinstance(item, str)]


# ---- a prefill's trailing whitespace ---------------------------------------------------


async def test_a_stream_continued_on_claude_does_not_repeat_the_space_its_prefill_lost(
    lifeline, client, claude, monkeypatch
):
    """The first target streamed "Hello " and failed; Claude was handed "Hello" (the API
    refuses a prefill ending in whitespace) and went on with " world!". The client saw
    "Hello  world!", the space twice."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    claude.pieces = [" ", "world", "!"]
    providers = {
        "flaky": {"kind": "fake", "reply": "Hello there", "fail_on_request": True, "chunks": 2},
        "claude": {"kind": "anthropic", "model": MODEL, "base_url": claude.url},
    }
    targets = ["flaky", {"provider": "claude", "prefill": True}]
    routes = {"default": {"targets": targets, "on_midstream": "continue"}}
    await lifeline(config(providers, routes))
    assembler = Assembler()
    asked = CompletionRequest(messages=[ChatMessage("user", "fail 503 after 1")], timeout_s=5)
    [_ async for _ in stream(client, asked, assembler)]
    assert assembler.reply is not None and assembler.reply.status == "ok", assembler.reply
    assert [body["messages"][-1] for body in claude.bodies] == [
        {"role": "assistant", "content": "Hello"}
    ]
    assert assembler.text == "Hello world!"


@pytest.mark.parametrize(
    ("prefill", "pieces", "text"),
    [
        ("Hello\n\n", ["\n", "\nWorld", "."], "World."),  # split across deltas
        ("Hello\n\n", ["\nWorld."], "World."),  # only as much as matches
        ("Hello \n", [" ", " World."], " World."),  # no more than was stripped
        ("Hello\n\n", [" World."], " World."),  # another whitespace: kept
        ("Hello ", ["World."], "World."),  # none repeated
        ("Hello", [" World."], " World."),  # nothing stripped
        ([TextPart("Hello "), TextPart(" ")], ["  ", "World."], "World."),  # in parts
    ],
)
async def test_an_answer_to_a_prefill_does_not_repeat_the_whitespace_stripped_from_it(
    provider, claude, prefill, pieces, text
):
    """Whole and streamed: what the client already holds (the prefill as it sent it, or the
    text so far of on_midstream "continue") joined to the answer reads as Claude wrote it."""
    claude.pieces = pieces
    request = chat(ChatMessage("user", "Greet the world"), ChatMessage("assistant", prefill))
    whole = await provider.complete(request, timeout_s=5)
    assert whole.content == text
    assert "".join(await streamed(provider, request)) == text
    sent = claude.bodies[-1]["messages"][-1]["content"]
    assert sent in ("Hello", [{"type": "text", "text": "Hello"}])


async def test_a_prefill_of_whitespace_only_is_sent_empty_and_not_repeated(provider, claude):
    claude.pieces = ["\n", "Sure."]
    request = chat(ChatMessage("user", "Go on"), ChatMessage("assistant", "\n"))
    assert "".join(await streamed(provider, request)) == "Sure."
    assert claude.bodies[-1]["messages"][-1] == {"role": "assistant", "content": ""}


# ---- empty messages --------------------------------------------------------------------


@pytest.mark.parametrize(
    "empty",
    [
        ChatMessage("assistant", [TextPart("")]),
        ChatMessage("assistant", ""),
        ChatMessage("assistant", None),
        ChatMessage("assistant", " "),
        ChatMessage("assistant", "\n\n"),
        ChatMessage("assistant", [TextPart(" "), TextPart("\n")]),
    ],
    ids=["empty-part", "empty-string", "none", "space", "newlines", "blank-parts"],
)
async def test_an_empty_or_blank_turn_in_the_conversation_is_left_out_and_its_neighbours_merge(
    provider, claude, empty
):
    """OpenAI takes an empty message, and sometimes answers with only whitespace and takes it
    back in the history; the Messages API refused the whole request with a 400 ("text content
    blocks must contain non-whitespace text"), so a fallback to Claude failed."""
    request = chat(ChatMessage("user", "Hello"), empty, ChatMessage("user", "Anyone there?"))
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hello"},
                {"type": "text", "text": "Anyone there?"},
            ],
        }
    ]


async def test_an_empty_user_message_between_two_answers_is_left_out(provider, claude):
    request = chat(
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Hi!"),
        ChatMessage("user", [TextPart("")]),
        ChatMessage("assistant", "Still here."),
        ChatMessage("user", "Say hi"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"] == [
        {"role": "user", "content": "Hello"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "Hi!"}, {"type": "text", "text": "Still here."}],
        },
        {"role": "user", "content": "Say hi"},
    ]


@pytest.mark.parametrize(
    "last",
    [
        ChatMessage("user", ""),
        ChatMessage("user", [TextPart("")]),
        ChatMessage("user", " \n"),
        ChatMessage("user", [TextPart(" "), TextPart("\n")]),
    ],
    ids=["empty-string", "empty-part", "blank-string", "blank-parts"],
)
async def test_an_empty_last_user_message_fails_before_the_call_saying_which(
    provider, claude, last
):
    """Left out, the assistant turn before it would become a prefill for Claude to go on
    from: a different question. Nothing is asked: the request's fault, named."""
    request = chat(
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "Hi!"),
        last,
    )
    whole = lambda: provider.complete(request, timeout_s=5)
    for call in (whole, lambda: streamed(provider, request)):
        with pytest.raises(ProviderError) as caught:
            await call()
        assert caught.value.kind == "bad_request"
        assert "messages[3]" in caught.value.message and "empty" in caught.value.message
    assert claude.bodies == []


async def test_an_empty_last_assistant_turn_is_still_sent(provider, claude):
    request = chat(ChatMessage("user", "Hello"), ChatMessage("assistant", [TextPart("")]))
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"][-1] == {"role": "assistant", "content": ""}


# ---- whitespace-only messages and no messages -------------------------------------------


async def test_whitespace_beside_a_tool_call_is_left_out_and_the_call_sent(provider, claude):
    call = ToolCall(id="call_1", name="weather", arguments='{"city": "Oslo"}')
    request = chat(
        ChatMessage("user", "Weather in Oslo?"),
        ChatMessage("assistant", "\n", tool_calls=[call]),
        ChatMessage("tool", "Sunny", tool_call_id="call_1"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}
        ],
    }


async def test_whitespace_beside_other_text_is_sent_as_it_is(provider, claude):
    parts = [TextPart("Line one"), TextPart("\n"), TextPart("Line two")]
    request = chat(
        ChatMessage("user", parts), ChatMessage("assistant", "Ok."), ChatMessage("user", "Go")
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert [b["text"] for b in claude.bodies[-1]["messages"][0]["content"]] == [
        "Line one",
        "\n",
        "Line two",
    ]


@pytest.mark.parametrize("role", ["system", "developer"])
async def test_a_request_of_only_system_messages_fails_before_the_call_saying_what_to_add(
    provider, claude, role
):
    """OpenAI answers a request that is all instructions; the Messages API refuses one with no
    messages. Nothing is asked: the request's fault, named, and what to add."""
    request = chat(ChatMessage(role, "Write a haiku about the sea."))
    whole = lambda: provider.complete(request, timeout_s=5)
    for call in (whole, lambda: streamed(provider, request)):
        with pytest.raises(ProviderError) as caught:
            await call()
        assert caught.value.kind == "bad_request"
        assert "add a user message" in caught.value.message
    assert claude.bodies == []


# ---- blank system prompts and tool results ----------------------------------------------


@pytest.mark.parametrize(
    ("system", "sent"),
    [
        ([ChatMessage("system", " ")], None),
        ([ChatMessage("developer", "\n\n")], None),
        ([ChatMessage("system", [TextPart(" "), TextPart("")])], None),
        ([ChatMessage("system", "Be brief."), ChatMessage("developer", "\n")], "Be brief."),
        (
            [
                ChatMessage(
                    "system", [TextPart("Be brief."), TextPart("\n\n"), TextPart("Be kind.")]
                )
            ],
            [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        ),
    ],
    ids=["space", "newlines", "blank-parts", "beside-another", "part-between-others"],
)
async def test_a_blank_system_prompt_is_left_out(provider, claude, system, sent):
    """OpenAI takes a system message of only whitespace (a template whose instructions came
    out empty); the Messages API refused the whole request with a 400 ("system: text content
    blocks must contain non-whitespace text"), so every fallback of it to Claude failed."""
    request = chat(*system, ChatMessage("user", "Hello"))
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1].get("system") == sent


@pytest.mark.parametrize(
    "result",
    ["", " ", "\n", None, [TextPart(" ")], [TextPart(""), TextPart("\n")]],
    ids=["empty", "space", "newline", "none", "blank-part", "blank-parts"],
)
async def test_a_blank_tool_result_is_sent_as_the_documented_empty_result(provider, claude, result):
    """A tool that printed nothing, or only a line end: OpenAI takes its empty or blank
    result, and the Messages API refused the request. The API documents a tool_result without
    content as an empty result: that is what is sent."""
    call = ToolCall(id="call_1", name="touch", arguments='{"path": "a.txt"}')
    request = chat(
        ChatMessage("user", "Create a.txt"),
        ChatMessage("assistant", None, tool_calls=[call]),
        ChatMessage("tool", result, tool_call_id="call_1"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "call_1"}],
    }


# ---- the first turn ---------------------------------------------------------------------


async def test_a_conversation_the_assistant_begins_is_sent_as_it_begins(provider, claude):
    """A greeting the assistant opened with, kept in the history. The Messages API no longer
    requires a first user turn (its reference says only that consecutive turns of one role
    are combined), so nothing is made up before it: a user turn of placeholder text would be
    words the user never wrote."""
    request = chat(
        ChatMessage("system", "Be brief."),
        ChatMessage("assistant", "Hi! How can I help?"),
        ChatMessage("user", "Tell me a joke"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    assert claude.bodies[-1]["messages"] == [
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]


# ---- one conversion per call ------------------------------------------------------------


async def test_a_request_ending_in_a_prefill_is_converted_once_per_call(
    provider, claude, monkeypatch
):
    """The whitespace stripped from a prefill was found by converting the whole conversation
    a second time, its inline images (megabytes of base64 each) and all."""
    converted: list[ImagePart] = []
    convert = anthropic._image_source

    def counted(part: ImagePart) -> dict[str, Any]:
        converted.append(part)
        return convert(part)

    monkeypatch.setattr(anthropic, "_image_source", counted)
    claude.pieces = ["\n", "World."]
    image = ImagePart(url=f"data:image/png;base64,{PNG}")
    request = chat(
        ChatMessage("user", [TextPart("Greet what you see"), image]),
        ChatMessage("assistant", "Hello\n"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "World."
    assert len(converted) == 1
    assert "".join(await streamed(provider, request)) == "World."
    assert len(converted) == 2


async def test_concurrent_calls_each_leave_out_only_their_own_prefills_whitespace(provider, claude):
    """The whitespace each call's body left off its prefill is that call's, however the calls
    on one provider interleave."""
    claude.pieces = ["\n", "\nWorld."]

    async def answered(prefill: str, whole: bool) -> str:
        request = chat(ChatMessage("user", "Greet the world"), ChatMessage("assistant", prefill))
        if whole:
            return (await provider.complete(request, timeout_s=5)).content
        return "".join(await streamed(provider, request))

    prefills = {"Hello\n\n": "World.", "Hello": "\n\nWorld.", "Hello\n": "\nWorld."}
    calls = [(prefill, whole) for prefill in prefills for whole in (True, False)]
    texts = await asyncio.gather(*(answered(prefill, whole) for prefill, whole in calls))
    assert texts == [prefills[prefill] for prefill, _ in calls]


# ---- inline images ----------------------------------------------------------------------

# The first bytes of a JPEG (a JFIF header), base64: what the API reads to tell its type.
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01").decode()


@pytest.mark.parametrize(
    ("image", "sent"),
    [
        (ImagePart(data=JPEG, media_type="image/png"), "image/jpeg"),
        (ImagePart(data=JPEG, media_type="image/jpg"), "image/jpeg"),
        (ImagePart(url=f"data:image/jpg;base64,{JPEG}"), "image/jpeg"),
        (ImagePart(data=PNG, media_type="image/PNG"), "image/png"),
        (ImagePart(data=PNG, media_type="image/octet-stream"), "image/png"),
    ],
    ids=["jpeg-said-png", "jpg", "jpg-data-url", "upper-case", "unnamed-type"],
)
async def test_an_inline_image_is_sent_as_the_type_its_bytes_are(provider, claude, image, sent):
    """OpenAI reads an image whatever type it is said to be; the Messages API refuses one
    whose media_type is not its own four names, or not what the bytes are (a screenshot tool
    that labels every image PNG, image/jpg from a file name): a 400 on every fallback of such
    a request to Claude, and on a tool result in any later turn of the conversation."""
    call = ToolCall(id="call_1", name="screenshot", arguments="{}")
    request = chat(
        ChatMessage("user", [TextPart("What is this?"), image]),
        ChatMessage("assistant", None, tool_calls=[call]),
        ChatMessage("tool", [image], tool_call_id="call_1"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    messages = claude.bodies[-1]["messages"]
    assert messages[0]["content"][1]["source"]["media_type"] == sent
    assert messages[2]["content"][0]["content"][0]["source"]["media_type"] == sent


async def test_an_inline_image_of_a_type_the_api_does_not_take_fails_before_the_call(
    provider, claude
):
    """A HEIC photo (an iPhone's own format), which the API refuses: the request's fault,
    named, without a call."""
    heic = base64.b64encode(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00").decode()
    request = chat(ChatMessage("user", [ImagePart(data=heic, media_type="image/heic")]))
    with pytest.raises(ProviderError) as caught:
        await provider.complete(request, timeout_s=5)
    assert caught.value.kind == "bad_request"
    assert "image/heic" in caught.value.message and "image/webp" in caught.value.message
    assert claude.bodies == []


def image(width: int, height: int, kind: str = "png", padding: int = 0) -> ImagePart:
    """An inline image whose header says `width` x `height` (all the API reads to refuse it)."""
    size_be = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    header = {
        "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + size_be + b"\x08\x06\x00\x00\x00",
        "gif": b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\0",
        "webp": b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0"
        + (width - 1).to_bytes(3, "little")
        + (height - 1).to_bytes(3, "little"),
        # SOI, an APP0 (JFIF) segment, then the frame header (SOF0): precision, height, width
        "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
        + b"\xff\xc0\x00\x11\x08"
        + height.to_bytes(2, "big")
        + width.to_bytes(2, "big")
        + b"\x03\x01\x22\x00",
    }[kind]
    data = base64.b64encode(header + b"\0" * padding).decode()
    return ImagePart(data=data, media_type=f"image/{kind}")


@pytest.mark.parametrize("kind", ["png", "gif", "webp", "jpeg"])
async def test_an_image_wider_than_the_api_takes_fails_before_the_call(provider, claude, kind):
    """The API refuses an image over 8000 pixels on a side (a 400): the request's fault, named,
    without a call, so the fallback tries the next target at once. One within is sent."""
    request = chat(ChatMessage("user", [TextPart("What is it?"), image(8001, 600, kind)]))
    with pytest.raises(ProviderError) as caught:
        await provider.complete(request, timeout_s=5)
    assert caught.value.kind == "bad_request"
    assert "8001x600" in caught.value.message and "8000" in caught.value.message
    assert claude.bodies == []
    await provider.complete(chat(ChatMessage("user", [image(8000, 600, kind)])), timeout_s=5)
    assert len(claude.bodies) == 1


async def test_in_a_request_of_over_20_images_each_takes_at_most_2000_pixels(provider, claude):
    twenty = [image(2001, 10)] * 20
    await provider.complete(chat(ChatMessage("user", twenty)), timeout_s=5)
    assert len(claude.bodies) == 1
    with pytest.raises(ProviderError) as caught:
        await provider.complete(chat(ChatMessage("user", [*twenty, image(10, 10)])), timeout_s=5)
    assert caught.value.kind == "bad_request"
    assert "2001x10" in caught.value.message and "more than 20 images" in caught.value.message
    assert len(claude.bodies) == 1


async def test_an_image_over_5_mib_of_base64_or_over_600_images_fail_before_the_call(
    provider, claude
):
    large = [image(100, 100, padding=5 * 1024 * 1024 * 3 // 4)]  # just past 5 MiB as base64
    for parts, said in [(large, "at most 5242880"), ([image(1, 1)] * 601, "at most 600")]:
        with pytest.raises(ProviderError) as caught:
            await provider.complete(chat(ChatMessage("user", parts)), timeout_s=5)
        assert caught.value.kind == "bad_request"
        assert said in caught.value.message
    assert claude.bodies == []


@pytest.mark.parametrize("role", ["system", "developer"])
async def test_images_in_a_system_message_reach_claude_in_a_user_turn(provider, claude, role):
    """The API's system prompt takes text only, and a system message's images were left out
    without a word: Claude answered about a diagram it never saw (OpenAI's worker sends them
    in a user message after it). They now go where the message was, as a user turn's images,
    merged with the user's words beside them."""
    request = chat(
        ChatMessage(
            role,
            [TextPart("Answer about this diagram."), ImagePart(data=PNG, media_type="image/png")],
        ),  # type: ignore[arg-type]
        ChatMessage("user", "What does it show?"),
    )
    assert (await provider.complete(request, timeout_s=5)).content == "Hi."
    body = claude.bodies[-1]
    assert body["system"] == [{"type": "text", "text": "Answer about this diagram."}]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                },
                {"type": "text", "text": "What does it show?"},
            ],
        }
    ]
