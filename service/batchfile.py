"""`lifeline batch`'s file: a JSONL file of requests read as jobs, their results collected
as they come and written as lines, and the progress line on stderr (the command itself,
which connects and submits, is service/cli.py's `cmd_batch`).

A file holds Lifeline's own requests (`{"id": ..., "messages": [...]}`, as `llm.complete`
takes them) or OpenAI Batch API lines (service/openai_batch.py translates those, and their
results back). Every line is read as a dispatcher reads a request before anything is sent,
and each one that would be refused is named with why, so a file is mended in one go.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from schemas.wire import CompletionReply, encoder, not_a_request, reply_decoder, request_decoder
from service import client


class BatchFile(msgspec.Struct):
    """A batch file read: its requests by id, as they will be published, and, for a file of
    OpenAI Batch API lines, each job's route (its results are written as the Batch API's
    output lines: service/openai_batch.py; None for a file of Lifeline's requests)."""

    jobs: dict[str, bytes]
    routes: dict[str, str] | None = None
    ignored: dict[str, int] = {}  # an OpenAI line's fields Lifeline ignores: how many lines

    def result_line(self, reply: CompletionReply, data: bytes) -> bytes:
        """The line a job's result is written as: `data`, the reply as it came (or re-encoded
        when its id is not the job's), or the Batch API's output line."""
        if self.routes is not None:
            from service import openai_batch

            return openai_batch.result_line(reply, self.routes.get(reply.id, ""), int(time.time()))
        return data


def read_batch(source: Path, models: Any = None) -> BatchFile:
    """The file's requests by id: their "id", else FILE:LINE:HASH, HASH of the file's full path
    and the line (so the same name in another folder, or an edited line, is another job; a file
    moved elsewhere starts over); or, in a file of OpenAI Batch API lines, their custom_id.
    `models`: what such a line's `model` may name (gateway.Models; None: a route)."""
    jobs: dict[str, bytes] = {}
    routes: dict[str, str] = {}
    # Lines no dispatcher would take, each said (the first few) before any is submitted: a
    # file with many bad lines is mended in one go, not one run per line.
    refused: list[str] = []
    lines = 0  # the requests the file holds: its lines that are not blank
    openai: bool | None = None  # whether the file's lines are OpenAI's, from its first request
    ignored: dict[str, int] = {}  # an OpenAI line's fields Lifeline ignores: how many lines
    where = source.resolve()
    # Lines end at "\n" only: JSON may hold U+2028 and the like raw, where splitlines() splits.
    # A byte order mark (Windows tools write one) is no part of the first line.
    for n, line in enumerate(source.read_text(encoding="utf-8-sig").split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        lines += 1
        try:
            body = json.loads(line)
        except json.JSONDecodeError as exc:
            refused.append(f"{source}:{n}: not JSON ({exc})")
            continue
        if not isinstance(body, dict):
            refused.append(f"{source}:{n}: a request is a JSON object, not {_json_kind(body)}")
            continue
        if openai is None:
            openai = "custom_id" in body  # an OpenAI Batch API line names one; ours cannot
        elif openai != ("custom_id" in body):
            kind = "an OpenAI Batch API line" if openai else "a Lifeline request"
            refused.append(
                f"{source}:{n}: the file's first request is {kind}, and a file holds one kind: "
                "OpenAI Batch API lines (custom_id, method, url, body) or Lifeline's requests "
                '({"id": ..., "messages": [...]})'
            )
            continue
        if openai:
            from service import openai_batch  # the gateway's translation: for such a file only

            try:
                job_id, payload, route, skipped = openai_batch.to_job(body, models)
                client.check_job_id(job_id)
            except ValueError as exc:
                refused.append(f"{source}:{n}: {exc}")
                continue
            if job_id in jobs:
                refused.append(f"{source}:{n}: custom_id {job_id!r} appears twice")
                continue
            for name in skipped:
                ignored[name] = ignored.get(name, 0) + 1
            jobs[job_id], routes[job_id] = payload, route
            continue
        digest = hashlib.sha256(f"{where}\n{line}".encode()).hexdigest()[:12]
        job_id = str(body.get("id") or f"{source.name[:200]}:{n}:{digest}")
        try:
            client.check_job_id(job_id)
        except ValueError as exc:
            refused.append(f"{source}:{n}: {exc}")
            continue
        body["id"] = job_id
        if job_id in jobs:
            refused.append(f"{source}:{n}: id {job_id!r} appears twice")
            continue
        jobs[job_id] = json.dumps(body).encode()
        try:
            request_decoder.decode(jobs[job_id])
        except (msgspec.DecodeError, RecursionError) as exc:
            refused.append(f"{source}:{n}: {not_a_request(exc, jobs[job_id])}")
    if refused:
        shown = refused[:_REFUSED_SHOWN]
        if len(refused) > _REFUSED_SHOWN:
            shown.append(f"... and {len(refused) - _REFUSED_SHOWN} more")
        if lines == 1:
            which = f"the one line of {source} is not a request"
        else:
            are = "is not a request" if len(refused) == 1 else "are not requests"
            which = f"{len(refused)} of the {lines} lines of {source} {are}"
        guide = 'the wire contract: README\'s "Wire contract v1"'
        if openai:
            guide = 'OpenAI Batch API files: README\'s "Durable jobs"'
        raise ValueError(
            "\n".join(shown) + f"\n{which} ({guide}); nothing was submitted: mend "
            f"{'it' if len(refused) == 1 else 'them'} and run again"
        )
    return BatchFile(jobs, routes if openai else None, ignored)


_REFUSED_SHOWN = 5  # a batch's refused lines said one by one; the rest counted


def _json_kind(value: object) -> str:
    """What a JSON value that is no object is, as its line's refusal names it."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return "a number"


def results_in(out_path: Path) -> dict[str, bool]:
    """The ids that already have a result line, each with whether it is ok (a line cut short
    by a crash is ignored). Only a regular file is read: /dev/stdout, a pipe or a terminal has
    nothing to resume from (reading one waited for input that never came)."""
    if not out_path.is_file():
        return {}
    results = {}
    for line in out_path.read_bytes().splitlines():
        try:
            reply = reply_decoder.decode(line)
        except msgspec.DecodeError:
            if b'"custom_id"' in line:  # an OpenAI Batch API output line
                from service import openai_batch

                if (result := openai_batch.read_result_line(line)) is not None:
                    results[result[0]] = result[1]
            continue
        results[reply.id] = reply.status == "ok"
    return results


class Results:
    """A batch's results as they come: each job's pushed to its own subject of the run's inbox
    (`notify`), those of jobs submitted by an earlier run (acknowledged as duplicates: they
    notify that run) asked of a dispatcher every few seconds; each written once to `out`."""

    def __init__(
        self,
        nc: Any,
        pending: dict[str, tuple[str, bytes]],
        out: Any,
        progress: Progress,
        bucket: str,
        batch: BatchFile,
    ) -> None:
        self.nc, self.pending, self.bucket, self.batch = nc, pending, bucket, batch
        self.out, self.progress = out, progress
        self.inbox = nc.new_inbox()
        self.keys: dict[str, str] = {}  # notify token -> job key
        self.asked: set[str] = set()  # job keys whose result is asked for (llm.jobs.result)
        self.reconnects = nc.stats["reconnects"]
        self._pushed: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def start(self) -> None:
        async def on_result(msg: Any) -> None:
            self._pushed.put_nowait((msg.subject.rpartition(".")[2], msg.data))

        await self.nc.subscribe(self.inbox + ".*", cb=on_result, pending_msgs_limit=-1)

    def notify(self, key: str) -> str:
        """The subject job `key`'s result is to be pushed to."""
        token = str(len(self.keys))
        self.keys[token] = key
        return f"{self.inbox}.{token}"

    async def collect(self, limit_s: float) -> None:
        """Write each pending job's result as it comes, until none is pending or limit_s is
        over."""
        pending, give_up = self.pending, time.monotonic() + limit_s
        ask_at = time.monotonic() + _BATCH_ASK_EVERY_S if self.asked else math.inf
        while pending and time.monotonic() < give_up:
            # Pushes are core NATS: none comes on a closed connection (a client reconnects
            # once), where the run waited out its whole --timeout; those published while it
            # was down are lost, and asked for once it is back.
            if self.nc.is_closed:
                raise client.Unreachable("the NATS connection was lost, and not made again")
            if self.nc.stats["reconnects"] != self.reconnects:
                self.reconnects = self.nc.stats["reconnects"]
                self.asked.update(self.keys.values())  # each job this run has published
                ask_at = time.monotonic()
            try:
                token, data = await asyncio.wait_for(self._pushed.get(), 1.0)
                got = [(self.keys.get(token), data)]
            except TimeoutError:
                got = []
                self.progress.show()
            if time.monotonic() >= ask_at:
                got += await self._ask([k for k in self.asked if k in pending])
                ask_at = time.monotonic() + _BATCH_ASK_EVERY_S
            for key, data in got:
                if key is None or key not in pending or not data:
                    continue  # another's, or notified twice (at least once), or none yet
                try:
                    reply = reply_decoder.decode(data)
                except msgspec.DecodeError:
                    continue
                job_id, _ = pending.pop(key)
                line = data
                if reply.id != job_id:  # refused before its id was read: the line names its job
                    reply = msgspec.structs.replace(reply, id=job_id)
                    line = encoder.encode(reply)
                write_result(self.out, self.batch.result_line(reply, line), reply, self.progress)

    async def _ask(self, keys: list[str]) -> list[tuple[str | None, bytes]]:
        """The results stored for these jobs (asked of a dispatcher, as `lifeline result`
        does), an empty one for each with none yet or none to be had now."""
        found: list[tuple[str | None, bytes]] = []
        for at in range(0, len(keys), _BATCH_ASKS_AT_ONCE):
            some = keys[at : at + _BATCH_ASKS_AT_ONCE]
            answers = await asyncio.gather(
                *(
                    client.stored_result(self.nc, self.pending[key][0], 0.0, self.bucket)
                    for key in some
                ),
                return_exceptions=True,
            )
            found += [
                (k, a if isinstance(a, bytes) else b"") for k, a in zip(some, answers, strict=True)
            ]
        return found


_BATCH_ASK_EVERY_S = 2.0  # how often a batch asks for the results of jobs submitted before
_BATCH_ASKS_AT_ONCE = 64


def write_result(out: Any, line: bytes, reply: CompletionReply, progress: Progress) -> None:
    out.write(line + b"\n")
    out.flush()
    progress.done += 1
    progress.failed += reply.status != "ok"
    progress.show()


class Progress:
    """One line on stderr: a bar, counts of done, failed and in flight, and an ETA."""

    def __init__(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped
        self.submitted = self.done = self.failed = 0
        self.started = time.monotonic()
        self._shown = 0.0
        self.waiting_for_room = False  # the jobs stream is full: submitting waits

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._shown < 0.1:
            return
        self._shown = now
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = now - self.started
        eta = "-"
        if self.done:
            seconds = elapsed / self.done * (self.total - self.done)
            eta = f"{int(seconds // 60)}:{int(seconds % 60):02d}"
        skipped = ""
        if self.skipped:
            skipped = f", {self.skipped} had {'its result' if self.skipped == 1 else 'results'}"
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, "
            f"{self.failed} failed, {self.submitted - self.done} in flight{skipped}, ETA {eta}"
        )
        if self.waiting_for_room:
            line += ", the jobs stream is full: waiting for room"
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
