"""A worker whose provider ignores deadlines and cancels, its test mode in front of it.

Built like tests/minimal_worker.py, but the `lifeline-test:` directives are answered first, by
a test layer with a deadline timer and cancel handling of its own, and never reach the
provider: its calls (an echo taking --call-s seconds, as a real model's call does) get no
timer, and a cancel does not stop them. It drops a request that comes past its deadline.

So every request carrying a directive is handled right, and only its ordinary calls are
answered past their deadline or a cancel: a conformance kit that cuts short only directives
passes it. tests/test_conformance.py shows the kit failing it on `deadline` and `cancel`.

    NATS_URL=nats://127.0.0.1:4222 LIFELINE_TEST_MODE=1 python tests/directives_first_worker.py
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
from minimal_worker import DIRECTIVE, MODEL, BadRequest, answer, failure, parse
from nats.aio.msg import Msg


def directive(request: dict[str, Any]) -> bool:
    last = request["messages"][-1] if request["messages"] else {}
    text = last.get("content") if last.get("role") == "user" else None
    return isinstance(text, str) and text.startswith(DIRECTIVE)


async def main() -> None:
    flags = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    flags.add_argument("--call-s", type=float, default=1.0, metavar="SECONDS")
    args = flags.parse_args()
    directives = argparse.Namespace(slow_calls=0.0, auth_as_server_error=False)
    name = os.environ.get("LIFELINE_PROVIDER", "conformance")
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")  # comma-separated for a cluster
    nc = await nats.connect([u.strip() for u in url.split(",") if u.strip()], name=name)
    tasks: set[asyncio.Task[None]] = set()
    directed: dict[str, asyncio.Task[Any]] = {}  # the test layer's cancellable directives

    async def test_layer(request: dict[str, Any], left_s: float, attempt: str) -> Any:
        """A directive, under the test layer's own deadline and cancels: None when cut short."""
        task = asyncio.ensure_future(answer(request, True, directives, asyncio.Lock()))
        if attempt:
            directed[attempt] = task
        try:
            async with asyncio.timeout(left_s):
                return await task
        except (TimeoutError, asyncio.CancelledError):
            return None
        finally:
            directed.pop(attempt, None)

    async def provider(request: dict[str, Any]) -> str:
        """The model's call: no deadline, no cancel."""
        await asyncio.sleep(args.call_s)
        last = request["messages"][-1] if request["messages"] else {}
        text = last.get("content")
        return f"echo: {text if isinstance(text, str) else ''}"

    async def handle(msg: Msg) -> None:
        headers = msg.headers or {}
        deadline = headers.get("Lifeline-Deadline-Ms", "")
        left_s = int(deadline) / 1000 - time.time() if deadline.isdigit() else 30.0
        if left_s <= 0 or not msg.reply:
            return
        try:
            request = parse(msg.data)
        except BadRequest as exc:
            await nc.publish(msg.reply, json.dumps(failure("bad_request", str(exc))).encode())
            return
        if directive(request):
            done = await test_layer(request, left_s, headers.get("Lifeline-Attempt-Id", ""))
            if done is None:
                return
            text, failed = done
            if failed is not None:
                await nc.publish(msg.reply, json.dumps(failed).encode())
                return
        else:
            text = await provider(request)
        chunks, content = 0, text
        stream_to = headers.get("Lifeline-Stream-To")
        if stream_to:
            for i, word in enumerate(text.split(" ")):
                await nc.publish(stream_to, (word if i == 0 else " " + word).encode())
                chunks += 1
            content = ""
        usage = {"input_tokens": 1, "output_tokens": len(text.split())}
        ok = {"status": "ok", "content": content, "model": MODEL, "usage": usage}
        await nc.publish(msg.reply, json.dumps({**ok, "chunks": chunks}).encode())

    async def on_request(msg: Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def on_cancel(msg: Msg) -> None:
        task = directed.get(msg.data.decode(errors="replace"))
        if task is not None:
            task.cancel()

    await nc.subscribe(f"llm.provider.{name}", queue=f"lifeline-provider-{name}", cb=on_request)
    await nc.subscribe(f"llm.cancel.{name}", cb=on_cancel)
    await nc.flush()
    print(f"serving llm.provider.{name}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
