"""A minimal provider worker written from the protocol alone: nats-py and json, nothing of
Lifeline, as a worker in another language would be. It answers with an echo of the last user
message, streams it word by word, and obeys the test mode's directives; so it passes the
conformance kit (service/conformance.py), which tests/test_conformance.py shows.

Each flag breaks it on purpose, to show the kit failing the right checks:

    --no-queue-group             subscribe to llm.provider.<name> outside the queue group
    --ignore-deadline            answer requests whose Lifeline-Deadline-Ms has passed
    --crash-on-bad-input         exit on a malformed body instead of answering bad_request
    --reply-to-wrong-subject     reply on <reply subject>.x instead of the reply subject
    --answer-failures-twice      send every failure reply twice
    --answer-twice-late          send every reply again a second later
    --deadline-on-arrival-only   drop a request past its deadline, but finish one that was
                                 still running when it passed
    --stream-when-late           stream a request that came past its deadline (its reply
                                 checked against the deadline; its chunks, not)
    --late-timeout-reply         answer `timeout` 450 ms after the deadline of a call still
                                 running when it passed (or that came less than 0.9 s late)
    --auth-as-server-error       map 401 and 403 to server_error
    --stream-errors-as-server-error  fail a streamed request as server_error, whatever its status
    --cancel-in-queue-group      subscribe to llm.cancel.<name> in the queue group
    --stream-in-reverse          publish a stream's chunks last one first
    --stream-and-repeat-content  put the streamed text in the final reply's content too
    --stream-duplicate-chunk     publish a stream's first chunk twice
    --stream-drop-chunk          leave a stream's second chunk out
    --stream-event-header        publish text chunks with the header Lifeline-Event: delta
    --stream-oversized-chunk     pad a stream's first chunk to max_payload less 1,000 bytes
    --stream-tool-call-unnamed   stream a tool call too, its first piece without id and name
    --reply-on-stream-to         send a streamed request's reply to its Lifeline-Stream-To
    --cancel-only-unstreamed     stop a cancelled attempt only when it is not streamed
    --answer-cancels             stop a cancelled attempt, then answer it with a failure
    --own-name                   serve llm.provider.minimal, not LIFELINE_PROVIDER's subject
    --text-content-only          take every message's content for a string (`.strip()` it), so
                                 a request with parts, or an assistant's null, goes unanswered
    --nats-url-whole             pass NATS_URL to nats.connect as one URL, so that a cluster's
                                 comma-separated list of servers fails it at start
    --json-errors-only           read a body with json.loads catching only JSONDecodeError, so
                                 a body not UTF-8 (or nested too deep) raises, unanswered

and these leave it conforming:

    --empty-model                answer `"model": ""` (the dispatcher names the target's)
    --slow-calls SECONDS         each answer (not a test directive) takes SECONDS, one at a
                                 time per replica

    NATS_URL=nats://127.0.0.1:4222 LIFELINE_PROVIDER=mine python tests/minimal_worker.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from typing import Any

import nats
from nats.aio.msg import Msg

ROLES = {"system", "user", "assistant", "tool", "developer"}
MODEL = "minimal-1"
DIRECTIVE = "lifeline-test:"


class BadRequest(ValueError):
    pass


def kind_of(status: int, auth_as_server_error: bool = False) -> str:
    """schemas.errors.classify_status, as another language would write it."""
    known = {408: "timeout", 429: "rate_limit", 401: "auth", 403: "auth", 402: "quota"}
    if auth_as_server_error:
        known |= {401: "server_error", 403: "server_error"}
    return known.get(status) or ("server_error" if status >= 500 else "bad_request")


def parse(data: bytes, json_errors_only: bool = False) -> dict[str, Any]:
    """The ProviderRequest's fields this worker reads, checked; BadRequest saying why not."""
    unreadable = (
        json.JSONDecodeError
        if json_errors_only
        else (UnicodeDecodeError, json.JSONDecodeError, RecursionError)
    )
    try:
        request = json.loads(data)
    except unreadable as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("id"), str):
        raise BadRequest("a ProviderRequest is an object with a string id")
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES for m in messages
    ):
        raise BadRequest("messages must be a list of messages with a role")
    return request


def failure(kind: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"status": "error", "kind": kind, "message": message, **fields}


async def answer(
    request: dict[str, Any], test_mode: bool, args: argparse.Namespace, model: asyncio.Lock
) -> tuple[str, dict[str, Any] | None]:
    """The answer's text, or a ProviderFailure instead."""
    last = request["messages"][-1] if request["messages"] else {}
    text = last.get("content") if last.get("role") == "user" else None
    if not (test_mode and isinstance(text, str) and text.startswith(DIRECTIVE)):
        if args.slow_calls:
            async with model:  # one call at a time, like a model on one thread
                await asyncio.sleep(args.slow_calls)
        return f"echo: {text if isinstance(text, str) else ''}", None
    match text[len(DIRECTIVE) :].split():
        case ["sleep", ms]:
            await asyncio.sleep(float(ms) / 1000)
            return "slept", None
        case ["fail", status]:
            kind = kind_of(int(status), args.auth_as_server_error)
            return "", failure(kind, "asked to", status_code=int(status))
        case ["fail", status, "retry_after", seconds]:
            kind = kind_of(int(status), args.auth_as_server_error)
            fields = {"status_code": int(status), "retry_after_s": float(seconds)}
            return "", failure(kind, "asked to", **fields)
    return "", failure("bad_request", f"no such directive: {text[:100]!r}")


async def main() -> None:
    flags = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags.add_argument("--no-queue-group", action="store_true")
    flags.add_argument("--ignore-deadline", action="store_true")
    flags.add_argument("--crash-on-bad-input", action="store_true")
    flags.add_argument("--reply-to-wrong-subject", action="store_true")
    flags.add_argument("--answer-failures-twice", action="store_true")
    flags.add_argument("--answer-twice-late", action="store_true")
    flags.add_argument("--deadline-on-arrival-only", action="store_true")
    flags.add_argument("--late-timeout-reply", action="store_true")
    flags.add_argument("--stream-when-late", action="store_true")
    flags.add_argument("--auth-as-server-error", action="store_true")
    flags.add_argument("--stream-errors-as-server-error", action="store_true")
    flags.add_argument("--cancel-in-queue-group", action="store_true")
    flags.add_argument("--stream-in-reverse", action="store_true")
    flags.add_argument("--stream-and-repeat-content", action="store_true")
    flags.add_argument("--stream-duplicate-chunk", action="store_true")
    flags.add_argument("--stream-drop-chunk", action="store_true")
    flags.add_argument("--stream-event-header", action="store_true")
    flags.add_argument("--stream-oversized-chunk", action="store_true")
    flags.add_argument("--stream-tool-call-unnamed", action="store_true")
    flags.add_argument("--reply-on-stream-to", action="store_true")
    flags.add_argument("--cancel-only-unstreamed", action="store_true")
    flags.add_argument("--answer-cancels", action="store_true")
    flags.add_argument("--own-name", action="store_true")
    flags.add_argument("--json-errors-only", action="store_true")
    flags.add_argument("--text-content-only", action="store_true")
    flags.add_argument("--nats-url-whole", action="store_true")
    flags.add_argument("--empty-model", action="store_true")
    flags.add_argument("--slow-calls", type=float, default=0.0, metavar="SECONDS")
    flags.add_argument("--never-answer", action="store_true")
    args = flags.parse_args()
    name = os.environ.get("LIFELINE_PROVIDER", "conformance")
    if args.own_name:
        name = "minimal"
    test_mode = os.environ.get("LIFELINE_TEST_MODE") == "1"
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    servers = url if args.nats_url_whole else [u.strip() for u in url.split(",") if u.strip()]
    nc = await nats.connect(servers, name=name)
    tasks: set[asyncio.Task[None]] = set()
    by_attempt: dict[str, asyncio.Task[None]] = {}
    model = asyncio.Lock()

    async def reply(msg: Msg, body: dict[str, Any]) -> None:
        if not msg.reply or args.never_answer:
            return
        subject = msg.reply + ".x" if args.reply_to_wrong_subject else msg.reply
        data = json.dumps(body).encode()
        await nc.publish(subject, data)
        if args.answer_failures_twice and body["status"] == "error":
            await nc.publish(subject, data)
        if args.answer_twice_late:
            again = asyncio.create_task(publish_later(1.0, subject, data))
            tasks.add(again)
            again.add_done_callback(tasks.discard)

    async def publish_later(delay_s: float, subject: str, data: bytes) -> None:
        await asyncio.sleep(delay_s)
        await nc.publish(subject, data)

    async def handle(msg: Msg) -> None:
        headers = msg.headers or {}
        deadline = headers.get("Lifeline-Deadline-Ms", "")
        left_s = int(deadline) / 1000 - time.time() if deadline.isdigit() else 30.0
        late_stream = args.stream_when_late and "Lifeline-Stream-To" in headers
        if left_s <= 0 and not args.ignore_deadline and not late_stream:
            if args.late_timeout_reply and left_s > -0.9:
                # Reached here only after its deadline (a loaded machine delays delivery): still
                # answered 450 ms past it, so the kit's verdict does not hang on the delivery.
                await asyncio.sleep(0.45 + left_s)
                await reply(msg, failure("timeout", "deadline passed"))
            return  # nobody waits for it any more
        try:
            request = parse(msg.data, args.json_errors_only)
            if args.text_content_only:  # raises on parts or null: nats-py logs it, no reply
                request["messages"] = [
                    {**m, "content": m["content"].strip()} for m in request["messages"]
                ]
        except BadRequest as exc:
            if args.crash_on_bad_input:
                print(f"crashing on bad input: {exc}", flush=True)
                os._exit(3)
            await reply(msg, failure("bad_request", str(exc)))
            return
        try:
            ignore = args.ignore_deadline or args.deadline_on_arrival_only
            async with asyncio.timeout(None if ignore else max(left_s, 0.001)):
                text, failed = await answer(request, test_mode, args, model)
        except ValueError as exc:  # a directive's number that is none
            text, failed = "", failure("bad_request", f"{exc}")
        except asyncio.CancelledError:
            if not args.answer_cancels:
                raise
            await reply(msg, failure("server_error", "cancelled"))
            return
        except TimeoutError:  # the deadline passed while working: no reply
            if args.late_timeout_reply:
                await asyncio.sleep(0.45)
                await reply(msg, failure("timeout", "deadline passed"))
            return
        if failed is not None:
            if args.stream_errors_as_server_error and "Lifeline-Stream-To" in headers:
                failed = {**failed, "kind": "server_error"}
            await reply(msg, failed)
            return
        chunks, content, tool_calls = 0, text, []
        stream_to = headers.get("Lifeline-Stream-To")
        if stream_to:
            words = text.split(" ")
            pieces = [word if i == 0 else " " + word for i, word in enumerate(words)]
            if args.stream_duplicate_chunk:
                pieces = [pieces[0], *pieces]
            if args.stream_oversized_chunk:  # over max_payload less 1 KiB, yet publishable
                pieces[0] = pieces[0].ljust(nc.max_payload - 1000)
            if args.stream_drop_chunk and len(pieces) > 1:
                pieces = pieces[:1] + pieces[2:]
            for piece in reversed(pieces) if args.stream_in_reverse else pieces:
                event = {"Lifeline-Event": "delta"} if args.stream_event_header else None
                await nc.publish(stream_to, piece.encode(), headers=event)
                chunks += 1
            if args.stream_tool_call_unnamed:  # the id and name come in its second piece
                call = {"id": "call_1", "name": "echo", "arguments": "{}"}
                first, second = (
                    {"index": 0, "arguments": "{"},
                    {**call, "index": 0, "arguments": "}"},
                )
                for piece in (first, second):
                    tool = {"Lifeline-Event": "tool_call"}
                    await nc.publish(stream_to, json.dumps(piece).encode(), headers=tool)
                    chunks += 1
                tool_calls = [call]
            content = text if args.stream_and_repeat_content else ""
            if late_stream and left_s <= 0:
                return  # the chunks went out all the same
        usage = {"input_tokens": 1, "output_tokens": len(text.split())}
        model_name = "" if args.empty_model else request.get("model") or MODEL
        ok = {"content": content, "model": model_name, "usage": usage}
        body = {"status": "ok", **ok, "chunks": chunks, "finish_reason": "stop"}
        if tool_calls:
            body |= {"tool_calls": tool_calls, "finish_reason": "tool_calls"}
        if stream_to and args.reply_on_stream_to:
            await nc.publish(stream_to, json.dumps(body).encode())
            return
        await reply(msg, body)

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        attempt = (msg.headers or {}).get("Lifeline-Attempt-Id")
        if args.cancel_only_unstreamed and (msg.headers or {}).get("Lifeline-Stream-To"):
            attempt = None
        if attempt:
            by_attempt[attempt] = task
            task.add_done_callback(lambda _: by_attempt.pop(attempt, None))

    async def on_cancel(msg: Msg) -> None:
        task = by_attempt.pop(msg.data.decode(errors="replace"), None)
        if task is not None:
            task.cancel()  # no reply: the dispatcher has given up on this attempt

    queue = "" if args.no_queue_group else f"lifeline-provider-{name}"
    await nc.subscribe(f"llm.provider.{name}", queue=queue, cb=on_request)
    cancel_queue = queue if args.cancel_in_queue_group else ""
    await nc.subscribe(f"llm.cancel.{name}", queue=cancel_queue, cb=on_cancel)
    await nc.flush()
    print(f"serving llm.provider.{name}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
