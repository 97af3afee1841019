"""OpenAI's Batch API files, as `lifeline batch` reads and writes them.

A file of OpenAI Batch API input lines runs through Lifeline's fallbacks as it is:

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "default", "messages": [...]}}

Each line becomes a job whose id is its `custom_id`, its body translated as the HTTP gateway
translates a chat request (`service/gateway.py`'s `translate`: `model` names a route, or, with
a config, one of its targets or providers; what Lifeline's wire cannot carry is refused or
ignored by the gateway's rules). Its result is written as the Batch API's output line,

    {"id": "batch_req_...", "custom_id": "q1", "error": null,
     "response": {"status_code": 200, "request_id": "q1", "body": {<chat.completion>}}}

the body being what the gateway answers the same request with: a chat.completion, or an error
in OpenAI's shape under the HTTP status the gateway gives it. A file holds one kind of line:
OpenAI's or Lifeline's own requests.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from schemas.wire import (
    MAX_ID_LENGTH,
    CompletionReply,
    CompletionRequest,
    clipped,
    encoder,
    not_a_request,
    request_decoder,
)
from service import gateway

URL = "/v1/chat/completions"  # the one endpoint of the Batch API that Lifeline serves
_URLS = (URL, "/chat/completions")  # OpenAI's, and Azure OpenAI's batch files' (no version)
_QUOTED = 100  # characters of a line's value quoted back in a refusal
_KEYS = ("custom_id", "method", "url", "body")


def to_job(
    line: dict[str, Any], models: gateway.Models | None
) -> tuple[str, bytes, str, list[str]]:
    """The job an input line asks for: its id (the line's custom_id), its request as published,
    the route it names and the body's fields it ignores; ValueError saying what is wrong with
    the line. `models`: what `model` may name (None: a route, which the dispatcher checks)."""
    request, ignored = to_request(line, models)
    payload = encoder.encode(request)
    try:  # what the wire's decoder holds beyond the gateway's rules
        request_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ValueError(not_a_request(exc, payload)) from None
    return line["custom_id"], payload, request.route or "default", ignored


def to_request(
    line: dict[str, Any], models: gateway.Models | None
) -> tuple[CompletionRequest, list[str]]:
    """The request an input line asks for (its id the line's custom_id) and the body's fields
    it ignores; ValueError saying what is wrong with the line."""
    if unknown := [key for key in line if key not in _KEYS]:
        raise ValueError(
            "an OpenAI Batch API line holds custom_id, method, url and body, not "
            + ", ".join(map(repr, unknown))
        )
    custom_id = line["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("its custom_id must be a string, not empty: it is the job's id")
    if len(custom_id) > MAX_ID_LENGTH:
        raise ValueError(
            f"its custom_id is {len(custom_id)} characters long: a job's id is at most "
            f"{MAX_ID_LENGTH}"
        )
    if (url := line.get("url")) not in _URLS:
        raise ValueError(
            f"its url is {clipped(repr(url), _QUOTED)}: Lifeline answers chat completions only "
            f"({URL!r}, or Azure's {_URLS[1]!r})"
        )
    if (method := line.get("method", "POST")) != "POST":
        raise ValueError(
            f"its method is {clipped(repr(method), _QUOTED)}: the Batch API's is 'POST'"
        )
    body = line.get("body")
    if not isinstance(body, dict):
        raise ValueError("its body must be a JSON object: the chat request")  # noqa: TRY004 - a line the user mends
    try:
        chat = gateway.decode_chat(json.dumps(body).encode())
        request, ignored = gateway.translate(chat, custom_id, models, None)
    except gateway.HTTPError as exc:
        raise ValueError(f"its body: {exc.message}") from None
    except ValueError as exc:  # a message or part the wire's types refuse
        raise ValueError(f"its body: {exc}") from None
    if chat.stream or chat.stream_options is not None:  # a job is answered whole
        ignored.append("stream")
    return request, ignored


def result_line(reply: CompletionReply, route: str, created: int) -> bytes:
    """A job's result as the Batch API's output line (see the module). `route`: the route its
    request went to (as the gateway gives it: named in the answer's `lifeline` field, and as
    its `model` when the reply names none), `created`: Unix seconds."""
    if reply.status == "ok":
        status, body = 200, gateway.completion_body(reply, route, created)
    else:
        error = gateway.reply_error(reply, route)
        status, body = error.status, error.body()
    digest = hashlib.sha256(reply.id.encode()).hexdigest()[:32]  # the same on a rerun
    response = {"status_code": status, "request_id": reply.id, "body": body}
    return encoder.encode(
        {"id": f"batch_req_{digest}", "custom_id": reply.id, "response": response, "error": None}
    )


def read_result_line(line: bytes) -> tuple[str, bool] | None:
    """(custom_id, whether it succeeded) of an output line `result_line` wrote, else None."""
    try:
        result = json.loads(line)
        custom_id, status = result["custom_id"], result["response"]["status_code"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    if not isinstance(custom_id, str):
        return None
    return custom_id, status == 200
