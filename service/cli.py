"""The `lifeline` command: run the service, run one part of it, or ask it something."""

from __future__ import annotations

import os
import sys
from types import TracebackType


def _interrupted_quietly(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    """A Ctrl-C nothing caught while this module imports its own modules (a good part of a
    start): it exits 130, as main() does for one that comes later, without Python's traceback
    through whatever import was under way."""
    if not issubclass(kind, KeyboardInterrupt):
        _excepthook(kind, value, tb)
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


# Lifeline's for the imports below only: a process that imports service.cli (a test, a
# plug-in's host) has its own hook back once they are done, and main() takes a later Ctrl-C.
_excepthook = sys.excepthook
sys.excepthook = _interrupted_quietly

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import importlib.metadata
import importlib.resources
import io
import json
import logging
import math
import re
import shlex
import shutil
import signal
import time
import tomllib
import uuid
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from schemas import Attempt, AuditEvent, ChatMessage, CompletionReply, CompletionRequest, subjects
from schemas.streaming import Assembler, Event
from schemas.wire import (
    MAX_ID_LENGTH,
    PAYLOAD_TOO_LARGE,
    ErrorInfo,
    NamedTool,
    Progress,
    ResponseFormat,
    Tool,
    ToolChoice,
    audit_decoder,
    encoder,
    message_bytes,
    reply_decoder,
)
from service import app, batchfile, client, discovery, jetstream, logs, loop, natsopts
from service.app import (
    Component,
    ConnectionWatch,
    NatsRefused,
    NatsUnreachable,
    Stack,
    close_providers,
    connect,
    make_providers,
    must_be_allowed_to_publish,
    must_have_subscribed,
    start_dispatcher,
    start_stack,
    start_worker,
)
from service.embedded import EmbeddedNats, EmbeddedNatsError, redact_url
from service.jobstore import ensure_jobs, ensure_jobs_as_a_client
from service.memory import settle_after_start
from service.probes import Probes, health_probes, parse_address
from service.shared_health import STALE_AFTER_S, BucketTooSlow, merge_status, read_bucket

if sys.excepthook is _interrupted_quietly:  # unless one of the imports set a hook of its own
    sys.excepthook = _excepthook

# What only some commands need is imported by them, so that the others start without it: the
# config (every provider kind, their HTTP client), telemetry (OpenTelemetry's SDK), the
# dispatcher and the workers (service.app's start_* functions).
if TYPE_CHECKING:
    from service import telemetry
    from service.config import Config, JobsSettings, Step
    from workers.plugin import PluginSettings

log = logging.getLogger("lifeline")

T = TypeVar("T")

DEFAULT_CONFIG = "lifeline.example.toml"
LOCAL_NATS = "nats://127.0.0.1:4222"

EPILOG = """\
examples:
  lifeline run                                  # everything, on an embedded NATS, example config
  lifeline ask "Why did the chicken cross the road?"
  lifeline ask --stream --route streaming "hello"  # tokens as they come, and one reset
  lifeline submit --id job-1 "hello later"; lifeline result job-1 --wait 30   # durable jobs
  lifeline batch jobs.jsonl                     # many jobs, results to jobs.results.jsonl
  lifeline dispatcher --config prod.toml --nats-url nats://nats:4222
  lifeline worker openai --config prod.toml     # one provider worker; run N for N replicas
  lifeline spec --out schemas/spec              # the wire's AsyncAPI document and JSON Schemas
  lifeline conformance -- node my-worker.mjs    # check your own worker against the protocol
  lifeline nats-config --config prod.toml --clients alice,bob > nats.conf   # least privilege
  lifeline health                               # every dispatcher and worker: ready? (exit 0/1)
  lifeline gateway --port 8080                  # OpenAI's Chat Completions over HTTP: base_url
                                                # http://127.0.0.1:8080/v1, model = a route

NATS: --nats-url, --nats-creds, ... else the config's [nats] table, else $NATS_URL, $NATS_CREDS,
  ... (as the `nats` CLI); `run` starts an embedded server when no URL is set at all.
Tracing: standard OTEL_* variables, e.g. OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318
Event loop: uvloop where installed; LIFELINE_EVENT_LOOP=asyncio for asyncio's own
Logs: LIFELINE_LOG_LEVEL=DEBUG|INFO|WARNING|ERROR, LIFELINE_LOG_FORMAT=text|json (a serving
  command's --log-format wins over it)
Exit status: 0 done; 1 failed (an error reply or none, an instance not ready, a check failed,
  NATS lost for good); 2 a mistake to fix first (the command line, the config, a port taken);
  3 no result or audit event for that id; 128+N stopped by signal N (130 Ctrl-C, 143 SIGTERM,
  129 SIGHUP), except a serving command stopped once started, its requests finished: 0
"""


def _version() -> str:
    try:
        return importlib.metadata.version("lifeline")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifeline",
        description="Lifeline: an LLM fallback service on NATS. Clients request llm.complete "
        "(llm.stream for tokens as they come, llm.jobs.submit through JetStream for durable "
        "jobs); Lifeline tries the route's providers in order and answers with the first good "
        "result.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbose = {"action": "store_true", "help": f"debug logging (else ${logs.LEVEL_ENV})"}
    parser.add_argument("-v", "--verbose", **verbose)
    parser.add_argument("--version", action="version", version=f"lifeline {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (
        _add_run,
        _add_dispatcher,
        _add_worker,
        _add_ask,
        _add_submit,
        _add_batch,
        _add_result,
        _add_audit,
        _add_check,
        _add_status,
        _add_health,
        _add_spec,
        _add_conformance,
        _add_gateway,
        _add_nats_config,
    ):
        add_command(commands)
    for command in commands.choices.values():  # after the command too: `lifeline run -v`
        command.add_argument("-v", "--verbose", default=argparse.SUPPRESS, **verbose)
    return parser


def _add_run(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="start NATS (embedded unless a URL is given), the dispatcher, every worker and "
        "the HTTP gateway",
        description="Everything in one process, for trying Lifeline and for small setups: an "
        "embedded NATS server with JetStream (unless --nats-url, the config's [nats] table or "
        "$NATS_URL names one), the dispatcher, one worker per provider of the config, and the "
        "OpenAI-compatible HTTP gateway on 127.0.0.1:8080. It prints the config's providers "
        "and routes, a command to ask it something, then a line per request. On Ctrl-C, "
        "SIGTERM or SIGHUP it lets requests in flight finish (dispatcher.shutdown_grace_s), "
        "stops everything and exits 0; it exits 1 when its NATS connection is gone for good "
        "or its embedded server dies, and 2 before it starts anything when the config, a "
        "provider's API key or a plug-in's model is wrong.",
    )
    _config_arg(run)
    _nats_arg(run, url_help="use this NATS server instead of starting one")
    run.add_argument(
        "--port",
        type=_port_or_any,
        help="port of the embedded NATS server (default: 4222; -1: any free port)",
    )
    run.add_argument("--quiet", action="store_true", help="do not print a line per request")
    _health_arg(run)
    _log_format_arg(run)
    gateway = run.add_mutually_exclusive_group()
    gateway.add_argument(
        "--gateway-port",
        type=_port_or_any,
        metavar="PORT",
        help="port of the OpenAI-compatible HTTP gateway on 127.0.0.1 (default: 8080, skipped "
        "with a warning when taken; -1: any free port)",
    )
    gateway.add_argument("--no-gateway", action="store_true", help="do not serve the HTTP gateway")


def _add_dispatcher(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dispatcher = commands.add_parser(
        "dispatcher",
        help="run one dispatcher against an existing NATS",
        description="Serves llm.complete, llm.stream and (with JetStream) llm.jobs.submit in "
        "the queue group of every dispatcher, calling the provider workers of the config's "
        "routes. On Ctrl-C, SIGTERM or SIGHUP it stops taking requests, lets those in flight "
        "finish for dispatcher.shutdown_grace_s (10 s), answers the rest shutting_down, and "
        "exits 0; it exits 1 when its NATS connection is gone for good. Stopped before it has "
        "started (still waiting for its NATS server, or signalled twice while starting), it "
        "exits 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM.",
    )
    _config_arg(dispatcher)
    _nats_arg(
        dispatcher,
        inbox_help=f"its inbox prefix (default: {subjects.DISPATCHER_INBOX_PREFIX}, where "
        "`lifeline nats-config` lets workers send stream chunks: leave it unset there)",
    )
    _health_arg(dispatcher)
    _log_format_arg(dispatcher)


def _add_worker(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = commands.add_parser(
        "worker",
        help="run one provider worker against an existing NATS",
        description="Serves llm.provider.<NAME> (and its cancels) for one provider of the "
        "config, in the queue group of its replicas. On Ctrl-C, SIGTERM or SIGHUP it stops "
        "taking calls, lets those in flight finish for 10 s, cancels the rest and answers them "
        "no_responders, so their dispatchers fall back at once, and exits 0; it exits 1 when "
        "its NATS connection is gone for good, and 2 before connecting when its API key is "
        "not set or its plug-in's model cannot be made.",
    )
    worker.add_argument(
        "name", metavar="NAME", help="provider name, a [providers.<NAME>] table in the config"
    )
    _config_arg(worker)
    _nats_arg(worker)
    _health_arg(worker)
    _log_format_arg(worker)


class _KeepsExamples(argparse.HelpFormatter):
    """argparse's own layout, but an epilog of examples keeps its lines and their alignment
    (a description is still wrapped to the terminal)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:\n"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_ask(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ask = commands.add_parser(
        "ask",
        help="send one request and print the answer and every attempt",
        description="Sends one request to the dispatchers on llm.complete (llm.stream with "
        "--stream) and waits for its answer, up to --timeout. The answer goes to stdout; who "
        "served it, every attempt and what followed it, and the request's id and trace id go "
        "to stderr. Exit status 0 for an ok answer, 1 for an error reply or none. Ctrl-C, "
        "SIGTERM or SIGHUP aborts the request at its dispatcher (its provider call is "
        "cancelled) and exits 128 + the signal's number.",
        epilog="""\
examples:
  lifeline ask "Why did the chicken cross the road?"   # against `lifeline run`'s example config
  lifeline ask --route json --json-output '{"a": 1}'   # retries, a skip, a checked JSON answer
  lifeline ask --stream --route streaming "hello"      # tokens as they come, and one reset
  lifeline ask --target backup-terse "hi"              # one target, by name, and its template
  lifeline ask - < prompt.txt > answer.txt             # the prompt from a file, the answer alone
""",
        formatter_class=_KeepsExamples,
    )
    ask.add_argument("prompt", metavar="TEXT", help="the user message; - reads it from stdin")
    ask.add_argument("--system", metavar="TEXT", help="a system message to send first")
    ask.add_argument("--route", default="default", help=_ROUTE_HELP)
    ask.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="TARGET",
        help="a target or provider name, repeatable, tried in order; overrides the route",
    )
    ask.add_argument(
        "--timeout",
        type=_positive_s,
        default=30.0,
        metavar="SECONDS",
        help="seconds for the whole request (default: 30)",
    )
    ask.add_argument(
        "--max-tokens", type=_at_least_one, metavar="N", help="the most tokens the answer may take"
    )
    ask.add_argument(
        "--json-output",
        action="store_true",
        help="ask for a JSON object (response_format json_object); "
        "other answers count as invalid_output",
    )
    ask.add_argument(
        "--no-fallback", action="store_true", help="try only the first target (and its retries)"
    )
    ask.add_argument(
        "--max-attempts",
        type=_at_least_one,
        metavar="N",
        help="cap on calls across retries and fallbacks",
    )
    ask.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="TARGET=FAULT",
        help="simulate a failure of TARGET: timeout, invalid_output, an error kind or an HTTP "
        "status; comma-separate for successive attempts (e.g. flaky=429,ok). Needs "
        "dispatcher.allow_fault_injection = true in the dispatchers' config",
    )
    ask.add_argument(
        "--tools",
        metavar="JSON|FILE",
        help="the tools the model may call, as a JSON list of "
        '{"name", "description", "parameters": <JSON Schema>}, inline or in a file',
    )
    ask.add_argument(
        "--tool-choice",
        metavar="CHOICE",
        help="with --tools: auto, none, required, or the name of the one tool the model must call",
    )
    shape = ask.add_mutually_exclusive_group()
    shape.add_argument(
        "--stream",
        action="store_true",
        help="stream the answer through llm.stream: tokens print as they arrive, and a failed "
        "attempt's voided text is shown struck through before the next attempt's",
    )
    ask.add_argument(
        "--on-midstream",
        choices=("reset", "continue", "fail"),
        help="with --stream: what a failure after the first token leads to (default: the route's)",
    )
    shape.add_argument("--json", action="store_true", help="print the raw JSON reply")
    _config_arg(ask, client=True)
    _nats_arg(ask)


def _add_check(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = commands.add_parser(
        "check-config",
        help="validate a config file and print what it defines",
        description="Checks a config file as `lifeline run` reads it, and prints what it "
        "defines. A plug-in provider's model class (kind python, or an installed plug-in's "
        "kind) is made with its settings, as its worker would make it, then closed; nothing "
        "connects to NATS or calls a provider.",
    )
    _config_arg(check)


def _add_submit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = commands.add_parser(
        "submit",
        help="publish one durable job (llm.jobs.submit); `lifeline result ID` fetches its answer",
        description="Publishes a request as a durable job through JetStream, with its id as "
        "Nats-Msg-Id: it waits in the jobs stream until a dispatcher answers it, even if none "
        "runs now; the answer is kept by id in the results bucket. Sending the same id again "
        "within the dedup window is acknowledged as a duplicate.",
    )
    submit.add_argument("prompt", metavar="TEXT", help="the user message; - reads it from stdin")
    submit.add_argument("--id", help="the job's id (default: a new random one)")
    submit.add_argument("--route", default="default", help=_ROUTE_HELP)
    submit.add_argument("--system", metavar="TEXT", help="a system message to send first")
    submit.add_argument(
        "--timeout",
        type=_positive_s,
        metavar="SECONDS",
        help="seconds for the job once it runs (default: its dispatcher's "
        "dispatcher.default_timeout_s, 60 unless configured)",
    )
    submit.add_argument(
        "--notify", metavar="SUBJECT", help="also publish the result on this subject"
    )
    _config_arg(submit, client=True)
    _nats_arg(submit)


def _add_batch(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = commands.add_parser(
        "batch",
        help="submit every request of a JSONL file as a durable job and write the results "
        "as they come",
        description="Each line of FILE is a request body (as for llm.complete); its id is "
        'its "id", else FILE:LINE:HASH (HASH: of the file\'s full path and the line, so an '
        "edited line, the same name in another folder, or a line moved by lines added or "
        'removed above it is another job: give lines an "id" to resume across edits). Every line '
        "is read as a dispatcher reads a request first: one that is not (not JSON, a field "
        "misspelt or unknown) stops the run before any is submitted, each named with why. "
        "Every job is published through JetStream, then the results "
        "are written to --out as JSON lines as they arrive (each pushed to this run's own "
        "inbox by the dispatcher that answers it; one submitted by an earlier run is asked "
        "for on llm.jobs.result: the rights of `lifeline nats-config`'s client role are "
        "enough), with a progress line on stderr. Rerun "
        "the same command to resume: ids that already have a line in --out are skipped, the "
        "others are submitted again (within jobs.dedup_window_s of the first run, 2 minutes "
        "by default, JetStream keeps each once; after it, a job still waiting from the first "
        "run may be called twice). A file of OpenAI Batch API lines (custom_id, method, url "
        "/v1/chat/completions, body) runs as it is: each body is read as the HTTP gateway "
        "reads a chat request (`model` names a route or a [model_aliases] alias, or with a "
        "config one of its targets or providers), its custom_id is the job's id, and the "
        "results are the Batch API's output lines.",
        epilog="""\
examples:
  echo '{"id": "q1", "messages": [{"role": "user", "content": "Summarise: ..."}]}' > jobs.jsonl
  lifeline batch jobs.jsonl                   # results in jobs.results.jsonl; rerun to resume
  lifeline batch jobs.jsonl --out done.jsonl --timeout 3600
  lifeline batch openai_batch_input.jsonl     # OpenAI's Batch API lines, answered in its shape
""",
        formatter_class=_KeepsExamples,
    )
    batch.add_argument(
        "file", help="a JSONL file of requests (Lifeline's, or OpenAI Batch API lines)"
    )
    batch.add_argument(
        "--out",
        metavar="FILE",
        help="where results go, one JSON line each (default: FILE.results.jsonl)",
    )
    batch.add_argument(
        "--timeout",
        type=_positive_s,
        default=600.0,
        metavar="SECONDS",
        help="give up waiting for results after this many seconds; rerun to resume (default: 600)",
    )
    _config_arg(batch, client=True)
    _nats_arg(batch)


def _add_result(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    result = commands.add_parser(
        "result",
        help="print the result of a job by id",
        description="Prints a job's result, whether or not anyone listened when it was "
        "answered: asked of a dispatcher (llm.jobs.result), else, while none answers, read "
        "from the results bucket (jobs.results_bucket). Exit status 0 for an ok "
        "result, 1 for an error result, 3 when there is none (yet).",
    )
    result.add_argument("id", help="the job's id")
    result.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for it (default: 0, look once)",
    )
    result.add_argument("--json", action="store_true", help="print the raw JSON result")
    _config_arg(result, client=True)
    _nats_arg(result)


def _add_audit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser(
        "audit",
        help="show audit events from the audit stream: the last ones, one id's, or follow",
        description="Reads the JetStream stream that keeps every request's audit event "
        "(audit.stream, LIFELINE_AUDIT by default), including those published while nobody "
        "listened: one line per event, or each event's JSON with --json.",
    )
    audit.add_argument("id", nargs="?", help="only this request's (or job's) events")
    audit.add_argument(
        "--last",
        type=_at_least_one,
        default=20,
        metavar="N",
        help="how many of the latest (default 20; with an ID, all of its events)",
    )
    audit.add_argument("--follow", "-f", action="store_true", help="then print new ones")
    audit.add_argument("--json", action="store_true", help="print each event's JSON")
    _config_arg(audit, client=True)
    _nats_arg(audit)


def _add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="each provider:model's circuit breaker, recent success rate and p50/p95 (of whole "
        "answers and of streams' first chunks), from the shared health bucket",
        description="Reads the JetStream key-value bucket the dispatchers share "
        "(dispatcher.health_bucket) and shows, per provider:model (what breakers are kept "
        "under; named targets on one model share it): its breaker "
        "(closed, open, half_open) and why, the calls of the last 60 s summed over every live "
        "dispatcher, their success rate (of those that answered), how many were cancelled "
        "before they answered (a hedge that lost, an abort), the p50/p95 latency of good "
        "answers and of streams' first chunks (last 30-60 s; a stream's hedge = \"p95\" "
        "waits for the latter), and how many calls skipped it while its breaker was open.",
    )
    status.add_argument(
        "--bucket",
        default=None,
        metavar="NAME",
        help="the bucket (default: the config's dispatcher.health_bucket, else lifeline_health)",
    )
    status.add_argument(
        "--timeout",
        type=_positive_s,
        default=10.0,
        metavar="SECONDS",
        help="seconds to read the whole bucket in (default: 10)",
    )
    status.add_argument("--json", action="store_true", help="print the merged view as JSON")
    _config_arg(status, client=True)
    _nats_arg(status)


def _add_health(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    health = commands.add_parser(
        "health",
        help="whether every live dispatcher and worker is connected, subscribed and not "
        "overloaded, and which gateways serve (found through NATS's $SRV service API); exit 1 "
        "when one is not ready",
        description="Asks $SRV.STATS, as `nats micro stats` does, and shows each Lifeline "
        "dispatcher and worker that answers: ready or not and why (not subscribed, or at its "
        "max_in_flight or max_in_flight_bytes), its requests in flight and their bytes, "
        "requests and errors since it started; and each HTTP gateway that answers, with its "
        "URL, chat completions in flight, connections open (not ready at --max-connections), "
        "requests and errors. Exits 1 when none answers or one is "
        "not ready.",
    )
    health.add_argument(
        "--expect-all",
        action="store_true",
        help="also exit 1 when no dispatcher answers, or a provider of --config has no worker",
    )
    health.add_argument(
        "--timeout",
        type=_positive_s,
        default=2.0,
        metavar="SECONDS",
        help="seconds to wait for answers; with --expect-all, for every expected instance "
        "(default: 2)",
    )
    health.add_argument("--json", action="store_true", help="print each instance as JSON")
    health.add_argument(
        "--config",
        metavar="FILE",
        help="the config whose [nats] table says how to connect and whose providers "
        f"--expect-all expects a worker of (default: ./{DEFAULT_CONFIG}, else the example "
        "installed with Lifeline)",
    )
    _nats_arg(health)


def _health_address(text: str) -> str:
    """--health-port, checked as the command line is read: checked once the probes start,
    after connecting, a mistake left a process waiting on an unreachable NATS without a word,
    or subscribed and said it was serving before it exited."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--health-port: ")) from None
    return text


def _health_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--health-port",
        type=_health_address,
        metavar="[HOST:]PORT",
        help="serve GET /healthz (live) and /readyz (connected, subscribed, not overloaded) over "
        "HTTP on this port, every interface unless HOST is given (default: off)",
    )


def _log_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines as text, or as one JSON object each for a log collector (default: "
        f"${logs.FORMAT_ENV}, else text)",
    )


def _add_spec(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spec = commands.add_parser(
        "spec",
        help="print the AsyncAPI document of Lifeline's wire; with --out, write it and the JSON "
        "Schema of every message",
        description="Generates, from the message types in schemas/ (no NATS needed), the "
        "AsyncAPI 3.0 document of every subject Lifeline uses (requests, replies, stream "
        "events, jobs, audit events, provider workers; their headers and queue groups) and a "
        "JSON Schema (draft 2020-12) per JSON message, for clients and workers in other "
        "languages. Without --out the AsyncAPI document goes to stdout. The copy in the "
        "repository: lifeline spec --out schemas/spec",
    )
    spec.add_argument(
        "--out",
        metavar="DIR",
        help="write asyncapi.json and one NAME.schema.json per message into DIR (made if missing)",
    )


def _add_conformance(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    conformance = commands.add_parser(
        "conformance",
        help="check a provider worker you wrote, in any language, against the worker protocol",
        usage="lifeline conformance [-h] [--provider NAME] [--replicas N] "
        "[--start-timeout SECONDS] [--timeout SECONDS] [--check NAME]... -- COMMAND [ARGS...]",
        description="""\
The conformance kit: starts a nats-server of its own and COMMAND as two replicas, then
checks on the wire that the worker keeps the protocol: replies decode; a malformed body gets
bad_request and the worker serves on; no reply past the deadline, nor after a cancel; one
reply per request through the queue group; streaming's chunks and their count; valid error
kinds; no replica crashed. Prints PASS or FAIL per check, with what was expected and what
came, and exits 1 when any failed.""",
        epilog="""\
COMMAND runs with these variables set:
  NATS_URL              the kit's nats-server, listed twice comma-separated (a cluster's
                        servers come so)
  LIFELINE_PROVIDER     the provider to serve: llm.provider.<NAME>, queue group
                        lifeline-provider-<NAME>, cancels on llm.cancel.<NAME>
  LIFELINE_TEST_MODE=1  test mode: a request whose last message is a user message
                          lifeline-test: sleep <ms>
                          lifeline-test: fail <status> [retry_after <seconds>]
                        is answered by the worker itself: ok after <ms> (the deadline
                        and a cancel still stop it), or a failure of the kind the status
                        maps to, with status_code and retry_after_s

examples:
  npm ci --prefix workers/examples/node    # once, in a clone: the Node example's nats.js
  lifeline conformance -- node workers/examples/node/worker.mjs
  lifeline conformance -- lifeline worker conformance --config my.toml
  lifeline conformance --provider mine --replicas 3 -- ./my-worker --verbose
  lifeline conformance --check deadline --check cancel -- ./my-worker   # one breach at a time

Lifeline's own workers obey test mode too; from Python, service.conformance.run_checks,
or the pytest fixture lifeline_conformance (pytest_plugins = ["service.conformance"]).
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conformance.add_argument(
        "--provider",
        default="conformance",
        metavar="NAME",
        help="the provider name the worker serves, passed as $LIFELINE_PROVIDER "
        "(default: conformance)",
    )
    conformance.add_argument(
        "--replicas",
        type=_at_least_one,
        default=2,
        metavar="N",
        help="how many copies of COMMAND to run (default: 2)",
    )
    conformance.add_argument(
        "--start-timeout",
        type=_positive_s,
        default=20.0,
        metavar="SECONDS",
        help="how long the replicas may take to subscribe (default: 20)",
    )
    conformance.add_argument(
        "--timeout",
        type=_positive_s,
        default=10.0,
        metavar="SECONDS",
        help="how long an answer may take beyond the worker's pace (the time its first "
        "request took, added once per call sent at once); raise it for a model slower than "
        "that per call (default: 10)",
    )
    conformance.add_argument(
        "--check",
        action="append",
        metavar="NAME",
        help="run only this check, after starts (repeatable; default: all): replies_decode, "
        "bad_request, deadline, cancel, one_reply_per_request, streaming, error_kinds, "
        "survives_bad_input",
    )
    conformance.add_argument(
        "worker_command",
        nargs="+",
        metavar="COMMAND",
        help="the worker's command and its arguments, after --",
    )


def _add_gateway(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gateway = commands.add_parser(
        "gateway",
        help="serve OpenAI's Chat Completions over HTTP (POST /v1/chat/completions, GET "
        "/v1/models) from Lifeline's NATS path",
        description="An OpenAI-compatible HTTP front door: point an OpenAI SDK's base_url at "
        "http://HOST:PORT/v1 and name a route (else a target or provider) as the model. It is a "
        "NATS client of llm.complete and llm.stream; run it beside `lifeline run` or against dispatchers "
        "anywhere. API keys: $LIFELINE_GATEWAY_KEYS (comma-separated), checked as "
        "`Authorization: Bearer <key>`; with none set, only loopback clients are served. "
        "GET /healthz and /readyz answer probes without a key.",
    )
    gateway.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    gateway.add_argument(
        "--port",
        type=_port_or_any,
        default=8080,
        help="port to listen on (default: 8080; 0 or -1: any free port)",
    )
    gateway.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="HTTP connections open at once; a connection past them is answered 503 and closed "
        "(default: the open-files limit less 256, at most 10,000; half of it under 512)",
    )
    _log_format_arg(gateway)
    _config_arg(gateway)
    _nats_arg(gateway)


def _add_nats_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nats_config = commands.add_parser(
        "nats-config",
        help="print a least-privilege nats-server configuration: a user per role (dispatchers, "
        "one per provider's workers, gateways, operators, clients), generated from the code's "
        "subjects",
        description="Prints a nats-server configuration (JetStream on, and an authorization "
        "block) in which each Lifeline role may publish and subscribe only what it needs: "
        "clients send requests and read their own replies (inbox prefix _INBOX.<user>) and "
        "their jobs' results by id; dispatchers run requests and jobs; each provider's "
        "workers see only that provider's subjects and answer through response permissions; "
        "HTTP gateways send requests as clients do and answer the NATS service API; "
        "operators read the audit stream, the health bucket and the NATS service API. Built "
        "from schemas/subjects.py and the config's providers, streams and buckets: regenerate "
        "it when they change. Passwords are read by nats-server from the environment "
        "variables the file names (LIFELINE_<USER>_PASSWORD).",
    )
    _config_arg(nats_config)
    nats_config.add_argument(
        "--clients",
        default="client",
        metavar="NAMES",
        help="client users, comma-separated (default: client)",
    )
    nats_config.add_argument(
        "--operators",
        default="operator",
        metavar="NAMES",
        help="operator users, comma-separated (default: operator)",
    )
    nats_config.add_argument(
        "--gateways",
        default="",
        metavar="NAMES",
        help="HTTP gateway users (`lifeline gateway`), comma-separated (default: none; each "
        "connects with inbox prefix _INBOX.<name>)",
    )


_ROUTE_HELP = "a route of the config the dispatchers run (default: default)"


def _config_arg(parser: argparse.ArgumentParser, client: bool = False) -> None:
    """--config: None when not given (see _config_path and _client_config_path)."""
    if client:  # it reads how to connect, and the names of the streams and buckets
        what = (
            "the config whose [nats] table (how to connect) and stream and bucket names this "
            f"command uses (default: ./{DEFAULT_CONFIG} if there, else the defaults)"
        )
    else:
        what = (
            f"TOML config file (default: ./{DEFAULT_CONFIG}, else the example installed with "
            "Lifeline)"
        )
    parser.add_argument("--config", metavar="FILE", help=what)


def _nats_arg(
    parser: argparse.ArgumentParser,
    url_help: str = "",
    inbox_help: str = "reply subjects' prefix instead of _INBOX",
) -> None:
    """How to connect to NATS, the same for every command (service/natsopts.py)."""
    group = parser.add_argument_group(
        "NATS connection",
        "Each option: its flag, else the config's [nats] table, else the environment variable "
        "the `nats` CLI reads. Prefer the variables (or [nats] password_env, token_env) to the "
        "secret flags, which other users can see in `ps`.",
    )
    group.add_argument(
        "--nats-url",
        metavar="URL",
        help=(url_help or f"NATS server (default: {LOCAL_NATS})")
        + "; a cluster's URLs comma-separated ($NATS_URL)",
    )
    for flag, metavar, what in (
        ("creds", "FILE", "a .creds file: user JWT and NKey seed"),
        ("nkey", "FILE", "a user NKey seed file"),
        ("user", "USER", "user name (alone: a token)"),
        ("password", "PASSWORD", "password"),
        ("token", "TOKEN", "token"),
        ("ca", "FILE", "the CA certificates (PEM) that signed the server's TLS certificate"),
        ("cert", "FILE", "a client certificate (PEM), for a server that verifies clients"),
        ("key", "FILE", "the client certificate's key (PEM)"),
        ("inbox-prefix", "PREFIX", inbox_help),
    ):
        env = natsopts.ENV[flag.replace("-", "_")]
        group.add_argument(f"--nats-{flag}", metavar=metavar, help=f"{what} (${env})")


def _nats_options(
    args: argparse.Namespace, config: Config | None = None, default_url: str = LOCAL_NATS
) -> natsopts.NatsOptions:
    """The command's NATS options: its flags, else the [nats] table of `config` (else of
    --config's file, when there is one), else the environment; files checked."""
    table, source = None, "config"
    if config is not None:
        table, source = config.nats, config.source
    elif (path := _client_config_path(args)) is not None:
        from service.config import load_nats_settings

        table, source = load_nats_settings(path), path
    flags = {key: getattr(args, f"nats_{key}", None) for key in natsopts.ENV}
    return natsopts.resolve(flags, table, default_url=default_url, source=source)


def _positive_s(text: str) -> float:
    """A number of seconds above 0 (argparse type)."""
    value = _number_of_seconds(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return value


def _seconds(text: str) -> float:
    """A number of seconds, 0 or more (argparse type)."""
    value = _number_of_seconds(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds, 0 or more")
    return value


def _number_of_seconds(text: str) -> float:
    """`text` as a finite number (NaN among them: each caller's own check refuses it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds")
    return value


def _port(text: str, least: int = 0) -> int:
    """A TCP port, 0 (any free one) to 65535 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not least <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port: {least} to 65535")
    return value


def _port_or_any(text: str) -> int:
    """A port, or -1 for any free one (argparse type)."""
    return _port(text, least=-1)


def _at_least_one(text: str) -> int:
    """A whole number of at least 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


_SERVING = ("run", "dispatcher", "worker", "gateway")  # commands that serve until stopped


def _raise_open_files_limit() -> None:
    """The soft limit on open files raised to the hard one, as Go's runtime does for every
    server since 1.19: a serving process holds a socket per HTTP connection (a worker's pool
    takes up to max_in_flight, the gateway up to --max-connections), and the common default
    soft limit of 1,024 would otherwise end in EMFILE under load, NATS reconnects included."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # Linux's default nr_open when the hard limit is "unlimited", which a soft one cannot be
        most = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < most:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, hard))
            log.debug("open files limit raised from %d to %d", soft, most)
    except (ImportError, OSError, ValueError) as exc:  # not on this platform, or not allowed
        log.debug("open files limit left as it is: %s", exc)


def _hide_otlp_secrets() -> None:
    """Every log line of a serving command without what its OTLP exporter settings hold that
    is secret: OpenTelemetry's SDK, which only they load, quotes them in its own lines."""
    from service import telemetry
    from workers.scrubbing import Scrubber

    logs.hide(Scrubber(telemetry.otlp_secrets()))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # `lifeline` alone: what it can do
        parser.print_help(sys.stderr)
        return 2
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            _unrecognized(parser, args.command, unknown)
        return _execute(args)
    except KeyboardInterrupt:  # in the command's loop, or before it (what the command loads)
        return 130


def _unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> NoReturn:
    """argparse's error for arguments a command does not take, said by the command's own
    parser (its usage, not the top level's) with the option a misspelt one was likely meant
    to be; exits 2."""
    import difflib  # only for this mistake

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    own = commands.choices[command]
    said = logs.hidden(f"unrecognized arguments: {' '.join(unknown)}")  # a URL's user info
    for option in (arg.split("=")[0] for arg in unknown if arg.startswith("--")):
        if close := difflib.get_close_matches(option, own._option_string_actions, n=1):
            said += f" (did you mean {close[0]}?)"
            break
    own.error(said)


def _execute(args: argparse.Namespace) -> int:
    """The command, everything it writes to stderr (its "lifeline: ..." lines, which quote
    exceptions, and its log lines) scrubbed of the credentials it was given (logs.hidden)."""
    if given := [secret for secret in _secrets_given(args) if len(secret) >= _SHORTEST_SECRET]:
        from workers.scrubbing import Scrubber  # the workers' own: none loaded with no secret

        logs.hide(Scrubber(given))
    with contextlib.redirect_stderr(_Scrubbed(sys.stderr)):
        try:
            return _command(args)
        except Exception as exc:  # noqa: BLE001 - a bug: its traceback through the same step
            logs.say_bug(exc)
            return 1


def _secrets_given(args: argparse.Namespace) -> list[str]:
    """The NATS credentials of the flags and the environment, and what the config file holds
    or names: its [nats] table's and its providers' (an api_key_env's value, the built-in
    kinds' default ones, a key written in a plug-in's settings), read from the file as it is,
    so that a config that fails to load is scrubbed of them too."""
    path = Path(getattr(args, "config", None) or DEFAULT_CONFIG)
    try:  # as the config's loader reads it, which says what is wrong with it, if anything
        table = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError):  # ValueError: TOML's, UTF-8's, 4,300 digits
        table = {}
    nats = table.get("nats") if isinstance(table.get("nats"), dict) else {}
    flags = {key: getattr(args, f"nats_{key}", None) for key in natsopts.ENV}
    # A user is a token only without a password, the config's included.
    password = any(nats.get(key) for key in ("password_env", "password_file"))
    found = natsopts.secrets_given(flags, password_elsewhere=password)
    files = {natsopts.ENV[k]: v for k, v in nats.items() if k in _NATS_FILES and isinstance(v, str)}
    found += natsopts.secrets_given({}, files)
    found += _secrets_in({k: v for k, v in nats.items() if k not in _NATS_FILES})
    if isinstance(providers := table.get("providers"), dict):
        from workers.registry import KINDS  # loaded with the config, by every command given one

        for kind, _ in KINDS.values():
            found += [
                os.environ.get(f.default, "")
                for f in msgspec.structs.fields(kind)
                if f.name == "api_key_env" and isinstance(f.default, str)
            ]
        found += _secrets_in(providers)
    return found


# As for the OTLP settings' secrets (service/telemetry.py): a shorter one ("nats", "admin")
# is a word every line may hold, and hiding it would hide what the line says.
_SHORTEST_SECRET = 6
_NATS_FILES = ("nkey", "creds", "ca", "cert", "key")  # paths, read by natsopts (seeds only)
# A key that holds a secret, or names where one is: api_key, api_key_env, token_file, ...
_SECRET_KEY = re.compile(r"(^|_)(key|token|secret|password|credentials?)(_env|_file)?$")


def _secrets_in(table: object) -> list[str]:
    """The secrets a config table holds or names at any depth, found by their keys' names."""
    found: list[str] = []
    for key, value in table.items() if isinstance(table, dict) else ():
        if isinstance(value, dict):
            found += _secrets_in(value)
        elif isinstance(value, str) and (match := _SECRET_KEY.search(key)):
            if match[3] == "_env":  # its value, and itself if a key was pasted there
                found += [os.environ.get(value, "")]
                found += [] if natsopts.looks_like_env_name(value) else [value]
            elif match[3] == "_file":
                found.append(natsopts.head_of(value).strip())
            else:
                found.append(value)
    return found


def _command(args: argparse.Namespace) -> int:
    try:
        logs.setup(verbose=args.verbose, form=getattr(args, "log_format", None))
        loop.loop_factory()  # LIFELINE_EVENT_LOOP, as the log variables: before any command
    except ValueError as exc:
        _failed(str(exc))
        return 2
    if args.command in _SERVING:
        _hide_otlp_secrets()
        _raise_open_files_limit()
    handlers = {
        "run": cmd_run,
        "dispatcher": cmd_dispatcher,
        "worker": cmd_worker,
        "ask": cmd_ask,
        "submit": cmd_submit,
        "result": cmd_result,
        "batch": cmd_batch,
        "audit": cmd_audit,
        "check-config": cmd_check,
        "status": cmd_status,
        "health": cmd_health,
        "spec": cmd_spec,
        "conformance": cmd_conformance,
        "gateway": cmd_gateway,
        "nats-config": cmd_nats_config,
    }
    command = handlers[args.command](args)
    try:
        return loop.run(_serving(command) if args.command in _SERVING else _stoppable(command))
    except (NatsUnreachable, EmbeddedNatsError, ValueError) as exc:  # ConfigError among them
        _failed(str(exc))
        return 2
    except BrokenPipeError:  # `lifeline ... | head`: the reader had enough; nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own advice
        return 1
    except OSError as exc:  # a file or a directory a command was given, as the system saw it
        _failed(str(exc))
        return 1
    except RuntimeError as exc:
        if "can't start new thread" not in str(exc):
            raise
        _failed(  # Python's words for EAGAIN from pthread_create
            "cannot start a thread: this process is at its limit of processes and threads "
            "(`ulimit -u`, a container's pids limit, systemd's TasksMax=): raise it"
        )
        return 1


def _failed(text: str) -> None:
    """Why a command stops before its end: "lifeline: <text>" on stderr, or an ERROR record
    under JSON logs."""
    logs.say(f"lifeline: {text}", message=text)


# What stops a serving command: Ctrl-C, SIGTERM, and SIGHUP (its terminal closed), each a
# graceful stop: requests in flight are finished (by default, SIGHUP killed it outright).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop:
    """The stop signals of a serving command, taken from its first moment (see _serving)."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.serving = False  # started: _until_signalled waits
        self.task: asyncio.Task[Any] | None = None  # the command, while it starts
        self.stopped_by: signal.Signals | None = None  # the signal that stopped it at once

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self.signalled, sig)

    def signalled(self, sig: signal.Signals) -> None:
        if self.serving or self.task is None:
            self.asked.set()  # a second one while stopping changes nothing
        elif not app.connections_made:
            # Still waiting for its NATS server: nothing taken, nothing to finish. Waiting for
            # a second signal, it was killed by its supervisor's (docker stop: after 10 s).
            log.warning("%s while waiting for NATS: stopping now", sig.name)
            self.asked.set()
            self.stopped_by = sig
            self.task.cancel()
        elif not self.asked.is_set():
            log.warning("%s while starting: stopping once started (again to stop now)", sig.name)
            self.asked.set()
        else:  # a second one while starting (waiting for a NATS server, say): stop now
            self.stopped_by = sig
            self.task.cancel()


_stop: _Stop | None = None  # the running serving command's


class _Wrapped(io.TextIOBase):
    """A text stream passing what is written on to `inner`: the terminal is still its."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        return self.inner.write(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.inner.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.inner.errors


class _Scrubbed(_Wrapped):
    """Every command's stderr: what it writes passes through logs.hidden, the one scrubbing
    step of this process's output (a print quoting an exception, a log line)."""

    def write(self, text: str) -> int:
        self.inner.write(logs.hidden(text))
        return len(text)


class _UntilGone(_Wrapped):
    """A serving command's stdout or stderr: once its reader is gone (`lifeline run | head`,
    `> /dev/full`), what it prints is dropped instead of raised, for a status line must not
    stop a service (it made a clean stop exit 1, or `run` exit at start, its embedded
    server's store left behind). The stream then writes to /dev/null, so that Python's own
    flush at exit finds nothing to complain of."""

    def __init__(self, inner: TextIO) -> None:
        super().__init__(inner)
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.inner.write(text)
            except OSError:
                self._went()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.inner.flush()
            except OSError:
                self._went()

    def _went(self) -> None:
        self.gone = True
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.inner.fileno())


async def _serving(command: Awaitable[int]) -> int:
    """A serving command, its stop signals taken before it connects: one that comes while it
    starts stops it as soon as it has started, its requests in flight finished (by default
    SIGTERM killed it there, subscribed already, and what it held got no reply); a second
    one while it starts stops it at once, as does the first while it still waits for its
    NATS server (nothing taken yet). What it prints goes while anyone reads it."""
    global _stop
    sys.stdout, sys.stderr = _UntilGone(sys.stdout), _UntilGone(sys.stderr)
    stop = _stop = _Stop()
    stop.task = asyncio.current_task()
    stop.install()
    try:
        return await command
    except asyncio.CancelledError:
        if stop.stopped_by is None:
            raise
        return 128 + stop.stopped_by  # stopped before it started: as a client command is
    finally:
        _stop = None


async def _stoppable(command: Awaitable[int]) -> int:
    """A client command (ask, submit, batch, ...): SIGTERM (timeout(1), a cancelled CI job)
    and SIGHUP (its terminal closed) cancel it as Ctrl-C does (asyncio.Runner's), so that a
    request it has in flight is aborted at its dispatcher; by default they killed it, and the
    request ran on to its end, its provider paid, for nobody. It exits 128 + the signal."""
    task = asyncio.current_task()
    assert task is not None
    came: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        came.append(sig)
        task.cancel()

    running = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        running.add_signal_handler(sig, stop, sig)
    try:
        return await command
    except asyncio.CancelledError:
        if not came:
            raise  # Ctrl-C: asyncio.Runner makes it a KeyboardInterrupt (exit 130)
        return 128 + came[0]


async def _until_signalled(lost: Awaitable[T] | None = None) -> T | None:
    """Wait for a stop signal (returns None; at once if one came while starting), or for
    `lost`, which ends when a NATS connection is gone for good (returns what `lost`
    returns)."""
    stop = _stop
    if stop is None:  # not through _serving (a test calling a command): taken from now
        stop = _Stop()
        stop.install()
    stop.serving = True
    signalled = asyncio.ensure_future(stop.asked.wait())
    gone = None if lost is None else asyncio.ensure_future(lost)
    waits: set[asyncio.Future[Any]] = {signalled} if gone is None else {signalled, gone}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in pending:
        wait.cancel()
    return None if gone is None or signalled in done else gone.result()


def _config_path(args: argparse.Namespace) -> str:
    """--config; or, without one outside a checkout (no ./lifeline.example.toml), the example
    config installed with Lifeline, so that `pip install` then `lifeline run` shows a fallback
    and every other command that reads the default config (check-config, dispatcher, worker,
    gateway, nats-config, health --expect-all) reads the same one. A --config given that is
    not there is a mistake, even the example's name."""
    if args.config is None:
        packaged = importlib.resources.files("service") / "example.toml"
        if not Path(DEFAULT_CONFIG).exists() and packaged.is_file():
            return str(packaged)
        return DEFAULT_CONFIG
    return str(args.config)


def _load_config(path: str) -> Config:
    """The config at `path`, its warnings (what it holds that will never act) shown on stderr:
    every command that loads it says them, once, before it does anything."""
    from service.config import load_config

    config = load_config(path)
    for warning in config.warnings:
        logs.warn(warning)
    return config


async def cmd_run(args: argparse.Namespace) -> int:
    from service import telemetry

    config = _load_config(_config_path(args))
    # Telemetry settings are checked before anything starts: a bad OTEL_* variable stops here.
    tracers = telemetry.tracer_provider_from_env("lifeline")
    meters = telemetry.meter_provider_from_env("lifeline")
    nats_opts = _nats_options(args, config, default_url="")
    if nats_opts.servers and args.port is not None:  # a NATS_URL left in the shell, say
        raise ValueError(
            f"--port {args.port} is for an embedded NATS server, and none starts: "
            f"{nats_opts.where('url')} names {nats_opts.shown}; drop one of them"
        )
    # Every provider made next, a plug-in's model with it (made once: the workers take them),
    # so that a missing API key or a model that cannot be made stops `run` (exit 2) before
    # anything starts, its embedded NATS included.
    providers = await make_providers(config, list(config.providers))
    server: EmbeddedNats | None = None
    stack: Stack | None = None
    lost = None
    try:
        # Left before the stack stops: through its drain it would still look ready.
        async with health_probes(args.health_port) as probes:  # a port in use: before NATS
            if not nats_opts.servers:
                server, url = _start_embedded(4222 if args.port is None else args.port)
                nats_opts = dataclasses.replace(nats_opts, servers=url)
            made, providers = providers, {}  # the stack's now: it closes those it cannot start
            stack = await start_stack(config, nats_opts, tracers, meters=meters, providers=made)
            probes.components = stack.components  # the gateway's joins it as it starts
            await _run_gateway(stack, config, nats_opts, args)
            # Connected before "ready" is printed: everything that connects has, by then.
            watcher = None if args.quiet else await _watch_audit(nats_opts)
            _print_started(config, nats_opts.shown)
            lost = await _serve_stack(stack, watcher, server)
    finally:
        await close_providers(providers)  # made, and no stack's: NATS or the probes failed
        if stack is not None:
            await stack.stop()
        telemetry.shut_down(tracers, meters)
        if server is not None:
            server.stop()
    print("stopped")
    return 0 if lost is None else 1


def _start_embedded(port: int) -> tuple[EmbeddedNats, str]:
    """An embedded NATS server for `run` when no URL is given, and its URL."""
    server = EmbeddedNats(port=port)
    try:
        url = server.start()
    except EmbeddedNatsError as exc:
        if "address already in use" in str(exc).lower():  # the hint is all there is to say
            raise EmbeddedNatsError(
                f"port {port} is taken (another nats-server, or `lifeline run` already "
                "running?): use --port -1 for any free port (make run PORT=-1), or --nats-url "
                "to use the server that is there"
            ) from None
        raise EmbeddedNatsError(
            f"the embedded nats-server did not start on port {port}; try --port -1 (any free "
            f"port), or --nats-url.\n{exc}"
        ) from None
    print(f"embedded NATS (JetStream) listening on {url}", flush=True)
    return server, url


async def _serve_stack(
    stack: Stack, watcher: Client | None, server: EmbeddedNats | None = None
) -> str | None:
    """Serve (`watcher` printing a line per request) until a signal (returns None), until a
    component's NATS connection is gone for good (returns its name), or until the embedded
    nats-server exits (nothing would restart it: the process stayed up, every connection
    retrying for ever, its /healthz 200)."""
    settle_after_start()
    lost = await _until_signalled(_first(stack.lost(), server.gone() if server else None))
    if lost is not None and lost.startswith("the embedded nats-server"):
        logs.say(f"\n{lost}\nstopping everything")
    elif lost is not None:
        logs.say(f"\n{lost} lost its NATS connection for good: stopping everything")
    else:
        print("\nshutting down: finishing requests in flight...")
    if watcher is not None:
        try:
            await watcher.drain()
        except nats.errors.Error:  # its connection was refused too: nothing left to print
            pass
    return lost


async def _first(*waits: Awaitable[str] | None) -> str:
    """What the first of `waits` (None: none) to end returns; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits if w is not None]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()


def _describe(config: Config) -> None:
    from service.config import breaker_settings

    for name, p in config.providers.items():
        print(f"provider {name:<12} kind={p.kind} model={p.model or '-'} timeout_s={p.timeout_s:g}")
    for name, spec in config.targets.items():
        print(
            f"target   {name:<12} provider={spec.provider} model={spec.model or '-'} "
            f"template={spec.template or '-'}"
        )
    for name, route in config.routes.items():
        fallback_on = (
            ", ".join(map(str, sorted(route.fallback_on, key=str)))
            if route.fallback_on is not None
            else "any failure"
        )
        print(
            f"route    {name:<12} {_chain(route.targets)}  (falls back on: {fallback_on}; "
            f"max_attempts {route.max_attempts})"
        )
        for kind, targets in route.by_kind.items():
            print(f"         {'':<12} on {kind}: {_chain(targets)}")
        if route.hedge_after_ms is not None or route.hedge_p95:
            after = "the target's recent p95" if route.hedge_p95 else f"{route.hedge_after_ms:g} ms"
            if route.hedge_p95 and route.hedge_after_ms is not None:
                after += f" (at least {route.hedge_after_ms:g} ms)"
            print(
                f"         {'':<12} hedges after {after}; hedge_budget {route.hedge_budget:g}, "
                f"retry_budget {route.retry_budget:g}"
            )
    for alias, name in config.model_aliases.items():
        print(f"alias    {alias:<12} -> {name}  (another name for it: a request's route, a model)")
    breaker = breaker_settings(config.breaker)
    print(
        f"breaker  opens after {_count(breaker.consecutive_failures, 'failure')} in a row or "
        f"{breaker.failure_rate:.0%} of {breaker.min_requests}+ calls in {breaker.window_s:g} s; "
        f"cooldown {breaker.cooldown_s:g} s" + ("" if breaker.enabled else " (disabled)")
    )


def _chain(steps: Sequence[Step]) -> str:
    """a -> {b x3 | c} -> d: a group shows its members and their weights."""

    def step(s: Step) -> str:
        if isinstance(s, list):
            return (
                "{"
                + " | ".join(f"{t.name}{f' x{t.weight:g}' if t.weight != 1 else ''}" for t in s)
                + "}"
            )
        return s.name or s.provider

    return " -> ".join(map(step, steps))


def _print_started(config: Config, url: str) -> None:
    _describe(config)
    hint = "" if url == LOCAL_NATS else f" --nats-url {redact_url(url)}"
    if "default" not in config.routes and config.routes:  # ask's --route is "default" unless told
        hint += f" --route {shlex.quote(next(iter(config.routes)))}"
    elif not config.routes and (named := [*config.targets, *config.providers]):
        hint += f" --target {shlex.quote(named[0])}"  # no route: a target (or a provider)
    print(
        f"dispatcher ready on {subjects.COMPLETE} at {redact_url(url)}. In another shell:\n"
        f'  {_own_command()} ask{hint} "Why did the chicken cross the road?"\nCtrl-C to stop.',
        flush=True,
    )


def _own_command() -> str:
    """How to call this same `lifeline` from another shell, venv activated or not."""
    script = Path(sys.executable).parent / "lifeline"
    if not script.exists():
        return f"{sys.executable} -m service.cli"
    if shutil.which("lifeline") == str(script):
        return "lifeline"
    return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)


async def _watch_audit(nats_opts: natsopts.NatsOptions) -> Client:
    """Print one line per request from the audit subject: the service's live log."""
    nc = await connect(nats_opts, "lifeline-run-watch")

    async def show(msg: Msg) -> None:
        try:
            event: AuditEvent = audit_decoder.decode(msg.data)
        except msgspec.DecodeError:
            return
        print(logs.printable(_audit_line(event)), flush=True)

    await nc.subscribe(subjects.AUDIT_ALL, cb=show)
    return nc


def _say(text: str) -> None:
    print(_shown(text))


def _shown(text: str) -> str:
    """`text` fit for a terminal: what other clients wrote (an audit event's id, a breaker's
    reason, an instance's name in $SRV answers) may hold escape sequences that would set the
    window's title or clear the screen; every character that is not printable is written as
    its escape (\\x1b), line by line."""
    if text.isprintable():
        return text
    return "\n".join(
        line
        if line.isprintable()
        else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
        for line in text.split("\n")
    )


def _json_shown(data: bytes) -> str:
    """A stored JSON document as one line of ASCII JSON: its non-ASCII characters (C1 controls
    among them, which a terminal acts on) as \\u escapes."""
    return json.dumps(json.loads(data), separators=(",", ":"))


def _audit_line(event: AuditEvent) -> str:
    """One request's audit event on one line: status, id, latency and the chain it took (print
    it through logs.printable: the id and the names are what a client wrote)."""
    chain = " -> ".join(f"{a.target or a.provider}:{_outcome(a)}" for a in event.attempts) or "-"
    why = f" ({event.error_type})" if event.error_type else ""
    streamed = ""
    if event.stream is not None:  # llm.stream
        streamed = (
            f"  streamed {_count(event.stream.chunks, 'chunk')}, "
            f"{_count(event.stream.resets, 'reset')}"
        )
    when = logs.iso_time(event.ts_unix_ms / 1000)  # when it was answered, as log lines show time
    return (
        f"{when} [{event.status}{why}] id={event.id} {event.latency_ms:.1f} ms  {chain}{streamed}"
    )


async def cmd_dispatcher(args: argparse.Namespace) -> int:
    from service import telemetry

    config = _load_config(_config_path(args))
    nats_opts = _nats_options(args, config)
    tracers = telemetry.tracer_provider_from_env("lifeline-dispatcher")
    meters = telemetry.meter_provider_from_env("lifeline-dispatcher")
    async with health_probes(args.health_port) as probes:  # a port in use: before NATS
        component, _ = await start_dispatcher(config, nats_opts, tracers, meters)
        log.info(
            "dispatcher serving %s on %s (queue group %s)",
            subjects.COMPLETE,
            nats_opts.describe(),
            subjects.DISPATCHER_QUEUE,
        )
        return await _serve(component, tracers, probes, meters)


async def cmd_worker(args: argparse.Namespace) -> int:
    from service import telemetry
    from service.config import ConfigError

    path = _config_path(args)
    config = _load_config(path)
    if args.name not in config.providers:
        configured = ", ".join(config.providers)
        raise ConfigError(f"{path}: no [providers.{args.name}] table (configured: {configured})")
    nats_opts = _nats_options(args, config)
    tracers = telemetry.tracer_provider_from_env(f"lifeline-worker-{args.name}")
    async with health_probes(args.health_port) as probes:  # a port in use: before NATS
        component, runtime = await start_worker(config, args.name, nats_opts, tracers)
        # Off the event loop, which serves calls already: a model's identifying_params() may
        # take its time (workers/plugin.py bounds it).
        identity = await asyncio.to_thread(_identity, runtime.provider)
        log.info(
            "worker %s serving %s on %s%s",
            args.name,
            subjects.provider_subject(args.name),
            nats_opts.describe(),
            identity,
        )
        return await _serve(component, tracers, probes)


def _identity(provider: object) -> str:
    """ ", model class a.b:C {params}" for a plug-in model, "" for a built-in kind."""
    params = getattr(provider, "identifying_params", None)
    label = getattr(provider, "label", None)
    if label is None or not callable(params):
        return ""
    shown = params()
    return f", model class {label}" + (f" {shown}" if shown else "")


async def _serve(
    component: Component,
    tracers: telemetry.Tracing,
    probes: Probes,
    meters: telemetry.MeterProvider | None = None,
) -> int:
    """Serve until a signal (exit 0) or until the NATS connection is gone for good (exit 1,
    so a supervisor restarts the process); `probes` (bound already) report on the component."""
    from service import telemetry

    lost = None
    try:
        probes.components.append(component)
        settle_after_start()
        lost = await _until_signalled(component.watch.wait_lost())
        if lost is None:
            log.info("stopping %s: finishing requests in flight", component.name)
    finally:
        await probes.stop()  # first: through the drain the component would still look ready
        await component.stop()
        telemetry.shut_down(tracers, meters)
    return 0 if lost is None else 1


async def cmd_ask(args: argparse.Namespace) -> int:
    if args.on_midstream and not args.stream:
        raise ValueError("--on-midstream is what a stream does after its first token: add --stream")
    nats_opts = _nats_options(args)
    url = nats_opts.shown  # fit to print
    request = _ask_request(args)
    nc = await _client(nats_opts, "lifeline-ask")
    if nc is None:
        return 1
    try:
        if args.stream:
            return await _ask_streaming(nc, url, request)
        reply = await _send(nc, url, request)
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM or SIGHUP: both ways have sent the abort
        # Said, for the exit status alone left the user wondering whether it ran on, paid for.
        after = "\n" if args.stream else ""  # the text so far ends without a line break
        print(
            f"{after}lifeline: stopped; request {request.id} aborted at its dispatcher",
            file=sys.stderr,
            flush=True,
        )
        raise
    if reply is None:
        return 1
    if args.json:
        print(encoder.encode(reply).decode())
    else:
        _print_reply(reply)
    return 0 if reply.status == "ok" else 1


def _client_config_path(args: argparse.Namespace) -> str | None:
    """A client command's config file: --config, else ./lifeline.example.toml if there, else
    None (the defaults: the installed example sets no [nats], stream or bucket of its own, and
    a client command starts faster without reading it)."""
    if args.config is not None:
        return str(args.config)
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def _config_or_default(args: argparse.Namespace) -> Config:
    """The config (for its stream and bucket names), or the defaults when no --config is given
    and the default config file is not there."""
    from service.config import parse_config

    path = _client_config_path(args)
    if path is None:
        return parse_config({"providers": {"none": {"kind": "fake"}}})
    return _load_config(path)


async def cmd_submit(args: argparse.Namespace) -> int:
    nats_opts = _nats_options(args)
    url = nats_opts.shown  # fit to print
    config = _config_or_default(args)
    settings, replicas = config.jobs, config.jetstream.replicas
    messages = ([ChatMessage("system", args.system)] if args.system else []) + [
        ChatMessage("user", _prompt(args))
    ]
    job_id = uuid.uuid4().hex if args.id is None else args.id
    try:
        if not job_id:  # `--id "$UNSET"`: a random id would not be the one the user meant
            raise ValueError("an empty id; leave --id out for a new random one")
        client.check_job_id(job_id)
        if len(job_id) > MAX_ID_LENGTH:
            raise ValueError(f"an id is at most {MAX_ID_LENGTH} characters, not {len(job_id)}")
    except ValueError as exc:
        print(f"lifeline: --id: {exc}", file=sys.stderr)
        return 2
    request = CompletionRequest(messages, id=job_id, route=args.route, timeout_s=args.timeout)
    headers = {subjects.MSG_ID: job_id}
    if args.notify:
        why = subjects.reply_subject_refused(args.notify)
        if why is not None:
            print(
                f"lifeline: --notify {args.notify!r}: no result is published there: {why}",
                file=sys.stderr,
            )
            return 2
        headers[subjects.NOTIFY] = args.notify
    nc = await _client(nats_opts, "lifeline-submit")
    if nc is None:
        return 1
    payload = encoder.encode(request)
    await _fit(nc, payload, headers)
    try:
        js = nc.jetstream(timeout=5)
        try:
            ack = await js.publish(subjects.JOBS_SUBMIT, payload, headers=headers)
        except nats.js.errors.NoStreamResponseError:  # no dispatcher has made the stream yet
            # (a least-privilege client may not make it: service/permissions.py)
            await ensure_jobs(js, settings, replicas)
            ack = await js.publish(subjects.JOBS_SUBMIT, payload, headers=headers)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the user gets one line
        print(
            f"lifeline: could not submit the job on {redact_url(url)} "
            f"({jetstream.hint(exc, replicas)})",
            file=sys.stderr,
        )
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if ack.duplicate:
        print(f"{job_id}: already submitted (a duplicate within the dedup window); kept once")
    else:
        print(f"{job_id}: submitted (stream {ack.stream}, sequence {ack.seq})")
    # With this command's config too: its [nats] table may name the server (and the user),
    # and without it the command printed would look for the job on the local default.
    where = f" --config {shlex.quote(args.config)}" if args.config is not None else ""
    where += f" --nats-url {shlex.quote(url)}" if args.nats_url else ""
    print(f"result: {_own_command()} result {shlex.quote(job_id)}{where} --wait 30")
    return 0


async def cmd_batch(args: argparse.Namespace) -> int:
    nats_opts = _nats_options(args)
    config = _config_or_default(args)
    settings, replicas = config.jobs, config.jetstream.replicas
    source = Path(args.file)
    if not source.is_file():
        what = "is a directory" if source.is_dir() else "does not exist"
        raise ValueError(f"{source} {what}: batch reads a JSONL file, one request per line")
    out_path = Path(args.out) if args.out else source.with_suffix(".results.jsonl")
    if out_path.is_dir():
        raise ValueError(f"--out {out_path} is a directory: name a file")
    # What an OpenAI Batch API line's `model` may name, as at the gateway: with no config, a
    # route (the dispatcher's config decides).
    models = _models(config) if _client_config_path(args) is not None else None
    batch = batchfile.read_batch(source, models)
    if batch.ignored:  # as the gateway's x-lifeline-ignored says it
        said = ", ".join(f"{name} ({_count(n, 'line')})" for name, n in batch.ignored.items())
        print(f"lifeline: ignored what Lifeline does not carry: {said}", file=sys.stderr)
    if batch.routes is not None and models is None:
        print(
            "lifeline: no --config: each line's `model` is sent as its route (a route's name "
            "or one of the dispatcher's [model_aliases]); give the dispatcher's config to name "
            "its targets and providers too, and to have each checked before anything is sent",
            file=sys.stderr,
        )
    jobs = batch.jobs
    if not jobs:
        print(f"{source} holds no request: nothing to submit")
        return 0
    done = batchfile.results_in(out_path)
    pending = {subjects.job_key(job_id): (job_id, body) for job_id, body in jobs.items()}
    pending = {key: job for key, job in pending.items() if job[0] not in done}
    # Those of an earlier run count as this one's would: a rerun exits as the first run did.
    failed_before = sum(not done[job_id] for job_id in jobs if job_id in done)
    if not pending:
        said = f"all {len(jobs)} jobs of {source} have results in {out_path}"
        if len(jobs) == 1:
            said = f"the 1 job of {source} has its result in {out_path}"
        print(said + (f", {failed_before} failed" if failed_before else ""))
        return 1 if failed_before else 0
    prefix = nats_opts.inbox_prefix or "_INBOX"  # nats-py's own
    if (why := subjects.reply_subject_refused(f"{prefix}.run.0")) is not None:
        # Results come pushed to this run's inbox, or asked for with a reply there: a
        # dispatcher publishes neither there, and the run would wait its whole --timeout.
        raise ValueError(
            f"inbox prefix {prefix!r}: no dispatcher publishes a job's result under it ({why}); "
            "connect with another (_INBOX.<user>), or with none"
        )
    # Opened before connecting: a results file that cannot be written (a read-only or missing
    # directory) stops the batch before anything is submitted.
    out = out_path.open("ab")
    if out_path.is_file() and out.tell() and not out_path.read_bytes().endswith(b"\n"):
        out.write(b"\n")  # a line cut short by a crash: the next one starts afresh
    nc = await _client(nats_opts, "lifeline-batch")
    if nc is None:
        out.close()
        return 1
    progress = batchfile.Progress(len(pending), skipped=len(jobs) - len(pending))
    try:
        js = nc.jetstream(timeout=5)
        await ensure_jobs_as_a_client(js, settings, replicas)
        # Each job's result is pushed to a subject of this run's own inbox (a client may read
        # nothing else: not the bucket, which holds every client's results).
        results = batchfile.Results(nc, pending, out, progress, settings.results_bucket, batch)
        await results.start()
        give_up = time.monotonic() + args.timeout  # for room in a full jobs stream, too
        for key, (job_id, body) in list(pending.items()):
            headers = {subjects.MSG_ID: job_id, subjects.NOTIFY: results.notify(key)}
            # Every line was read as a request before (batchfile.read_batch): its id is no
            # longer than a dispatcher takes, so JetStream takes it in the headers too (at most
            # 64 KiB).
            size = message_bytes(body, headers)
            if size > nc.max_payload:  # refused here, as the server would close the link
                message = f"the job is {size} bytes, over the NATS server's max_payload"
                refused = CompletionReply(
                    job_id, "error", error=ErrorInfo(PAYLOAD_TOO_LARGE, message)
                )
                progress.submitted += 1  # and done at once: never in flight
                batchfile.write_result(
                    out, batch.result_line(refused, encoder.encode(refused)), refused, progress
                )
                del pending[key]
                continue
            while True:
                try:
                    ack = await js.publish(subjects.JOBS_SUBMIT, body, headers=headers)
                    break
                except nats.js.errors.APIError as exc:
                    if exc.err_code != jetstream.STORE_FAILED or time.monotonic() > give_up:
                        raise
                    # The jobs stream is full (jobs.max_jobs waiting): results written as
                    # they come meanwhile, and the job sent again once some have left it.
                    progress.waiting_for_room = True
                    await results.collect(1.0)
            progress.waiting_for_room = False
            if ack.duplicate:  # submitted by an earlier run: its result notifies that run
                results.asked.add(key)
            progress.submitted += 1
            progress.show()
        await results.collect(args.timeout)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the user gets one line
        why = (  # NATS's refusals say what to do; the results file's errors speak for themselves
            jetstream.hint(exc, replicas)
            if isinstance(exc, nats.errors.Error)
            else f"{type(exc).__name__}: {exc}"
        )
        print(f"\nlifeline: batch stopped ({why}); rerun to resume", file=sys.stderr)
        return 1
    finally:
        out.close()
        with contextlib.suppress(Exception):
            await nc.close()
    progress.show(final=True)
    if pending:
        print(
            f"lifeline: {_count(len(pending), 'job')} still without a result after "
            f"{args.timeout:g} s; rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    earlier = f"; {_count(failed_before, 'job')} failed in an earlier run" if failed_before else ""
    print(f"results in {out_path}{earlier}")
    return 0 if not progress.failed and not failed_before else 1


def _models(config: Config) -> Any:
    """What a request's `model` may name at the HTTP gateway and in an OpenAI Batch file
    (gateway.Models): the config's routes, targets and providers, and its [model_aliases]."""
    from service import gateway  # the HTTP server (Starlette, uvicorn) loads for it only

    return gateway.Models(
        list(config.routes), [*config.targets, *config.providers], config.model_aliases
    )


async def cmd_result(args: argparse.Namespace) -> int:
    nats_opts = _nats_options(args)
    settings = _config_or_default(args).jobs
    nc = await _client(nats_opts, "lifeline-result")
    if nc is None:
        return 1
    try:
        data = await client.stored_result(nc, args.id, args.wait, settings.results_bucket)
    except client.LifelineError as exc:  # no dispatcher answers, and the bucket cannot be read
        print(f"lifeline: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if data is None:
        print(f"lifeline: {_no_result(args.id, args.wait, settings)}", file=sys.stderr)
        return 3
    reply = reply_decoder.decode(data)
    if args.json:
        print(data.decode())
    else:
        _print_reply(reply)
    return 0 if reply.status == "ok" else 1


def _no_result(job_id: str, waited_s: float, settings: JobsSettings) -> str:
    """Why a job may have no result, and what to do about it."""
    why = (
        "it was not submitted (to this server, with this id), is still waiting for a "
        "dispatcher and its workers or running (`lifeline health` shows them), or its result "
        f"expired after jobs.results_ttl_s ({settings.results_ttl_s:g} s)"
    )
    if waited_s:
        return f"no result for job {job_id!r} (waited {waited_s:g} s): {why}; wait longer"
    return f"no result for job {job_id!r} (yet): {why}; --wait SECONDS waits for it"


async def cmd_audit(args: argparse.Namespace) -> int:
    from service.audit import AuditStalled, read_events

    nats_opts = _nats_options(args)
    url = nats_opts.shown  # fit to print
    settings = _config_or_default(args).audit
    if not settings.stream:
        print(
            'lifeline: this config keeps no audit stream (audit.stream = ""): events went to '
            "live subscribers of llm.audit.> only",
            file=sys.stderr,
        )
        return 1
    nc = await _client(nats_opts, "lifeline-audit")
    if nc is None:
        return 1
    shown = 0
    try:
        # One id's events: every event, read through; otherwise the latest --last.
        last = 0 if args.id else args.last
        async for data in read_events(nc.jetstream(timeout=5), settings, last, args.follow):
            try:
                event = audit_decoder.decode(data)
            except msgspec.DecodeError as exc:  # not one of Lifeline's (or a newer one's)
                print(f"lifeline: skipping an event that is no AuditEvent ({exc})", file=sys.stderr)
                continue
            if args.id and event.id != args.id:
                continue
            shown += 1
            print(
                _json_shown(data) if args.json else logs.printable(_audit_line(event)), flush=True
            )
    except nats.js.errors.NotFoundError:
        print(
            f"lifeline: no audit stream {settings.stream} on {redact_url(url)}: no dispatcher "
            "with JetStream has run there yet, or none could make it (its log says why: "
            "JetStream's storage below audit.max_bytes, say)",
            file=sys.stderr,
        )
        return 1
    except AuditStalled as exc:
        print(f"lifeline: {exc}", file=sys.stderr)
        return 1
    except (nats.errors.Error, nats.js.errors.Error) as exc:  # no JetStream there, ...
        print(
            f"lifeline: could not read the audit stream on {redact_url(url)} "
            f"({jetstream.hint(exc, 1)})",
            file=sys.stderr,
        )
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if args.id and not shown:
        print(f"lifeline: no audit event for {args.id!r}", file=sys.stderr)
        return 3
    return 0


def _prompt(args: argparse.Namespace) -> str:
    """The user message: the argument, or stdin for `-` (`git diff | lifeline ask -`)."""
    # A pipe's last line break (`echo hi | lifeline ask -`) is no part of the prompt.
    return sys.stdin.read().removesuffix("\n") if args.prompt == "-" else args.prompt


def _ask_request(args: argparse.Namespace) -> CompletionRequest:
    messages = ([ChatMessage("system", args.system)] if args.system else []) + [
        ChatMessage("user", _prompt(args))
    ]
    return CompletionRequest(
        messages=messages,
        id=uuid.uuid4().hex,
        route=args.route,
        targets=args.targets,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        fallback=not args.no_fallback,
        max_attempts=args.max_attempts,
        faults=_faults(args.fault) or None,
        response_format=ResponseFormat("json_object") if args.json_output else None,
        on_midstream=args.on_midstream,
        tools=(tools := _tools(args.tools) if args.tools else None),
        tool_choice=_tool_choice(args.tool_choice, tools),
    )


def _tools(source: str) -> list[Tool]:
    """--tools: a JSON list of tools, inline or in a file; ValueError saying what is wrong.
    Text starting with [ or { is inline JSON (one tool's object, not in a list, was read as
    a file's name: "No such file or directory")."""
    expected = 'expected a JSON list of tools, [{"name", "description", "parameters"}, ...]'
    try:
        inline = source.lstrip().startswith(("[", "{"))
        data = source.encode() if inline else Path(source).read_bytes()
        return msgspec.json.decode(data, type=list[Tool])
    except FileNotFoundError:
        raise ValueError(
            f"--tools {source}: no such file; {expected}, inline or in a file"
        ) from None
    except OSError as exc:
        raise ValueError(f"--tools {source}: {exc.strerror}") from None
    except msgspec.ValidationError as exc:
        raise ValueError(f"--tools: {exc}; {expected}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"--tools: not JSON ({exc})") from None


_CHOICES: dict[str, ToolChoice] = {"auto": "auto", "none": "none", "required": "required"}


def _tool_choice(choice: str | None, tools: list[Tool] | None) -> ToolChoice | None:
    """--tool-choice, refused here (not sent to be refused as invalid_request) when it says
    how to use tools the command line does not give."""
    if choice is None:
        return None
    if not tools:
        raise ValueError(
            f"--tool-choice {choice} says how the model uses --tools: give --tools too"
        )
    names = [tool.name for tool in tools]
    if choice not in _CHOICES and choice not in names:
        raise ValueError(
            f"--tool-choice {choice}: not auto, none, required or one of --tools "
            f"({', '.join(names)})"
        )
    return _CHOICES.get(choice) or NamedTool(choice)


async def _ask_streaming(nc: Client, url: str, request: CompletionRequest) -> int:
    """Print the answer as its deltas arrive; a reset strikes the voided text through and
    says why, then the next attempt's text follows."""
    assembler = Assembler()
    printer = _StreamPrinter()

    try:
        # Refused by the server (a user whose role may not publish llm.stream), the request
        # went nowhere: client.stream says so at once (no abort sent), not after the stream's
        # whole timeout as a stall.
        async for event in client.stream(nc, request, assembler):
            printer.show(event)
    except client.NotPermitted as exc:  # said as `ask` says it: the server's refusal
        print(f"lifeline: {exc.__cause__ or exc}: no dispatcher got the request", file=sys.stderr)
        return 1
    except (client.NoDispatcher, TimeoutError, client.StreamGap) as exc:
        print(f"{_line_end(printer.printed)}lifeline: {exc} ({redact_url(url)})", file=sys.stderr)
        return 1
    except client.RequestTooLarge as exc:  # checked before anything is sent
        raise ValueError(f"{exc}: shorten the prompt") from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    reply = assembler.reply
    assert reply is not None
    print(_line_end(printer.printed), end="")
    _print_reply(reply)
    return 0 if reply.status == "ok" else 1


class _StreamPrinter:
    """A stream's events as `ask --stream` prints them: text on stdout as it comes, a reset
    on stderr with the text it voided struck through."""

    def __init__(self) -> None:
        self.shown: list[str] = []  # the deltas printed since the last reset
        self.printed = False  # anything on stdout: a note or the end then starts a line of its own

    def show(self, event: Event) -> None:
        if event.kind == "delta":
            self.shown.append(event.text)
            self.printed = self.printed or bool(event.text)
            print(event.text, end="", flush=True)
        elif event.kind == "tool_call":
            self.shown.append("")  # a reset's discard counts tool-call pieces too
            if event.tool_call is not None and event.tool_call.name:
                self.printed = True
                print(f"[calling {event.tool_call.name}]", end="", flush=True)
        elif event.kind == "reset" and event.reset is not None:
            reset = event.reset
            keep = max(len(self.shown) - reset.discard, 0)
            voided, self.shown = "".join(self.shown[keep:]), self.shown[:keep]
            what = (
                f"{_count(reset.discard, 'chunk')} voided"
                if reset.discard
                else "continuing from here"
            )
            print(  # a diagnostic: stderr, so `ask ... > answer.txt` keeps only text
                f"{_line_end(self.printed)}[reset: attempt {reset.attempt} failed with "
                f"{reset.error.type} "
                f"({what}){': ' + _struck(voided) if voided else ''}]",
                file=sys.stderr,
                flush=True,
            )


def _line_end(printed: bool) -> str:
    """The line break that ends the streamed text before a note or the reply, if any was
    printed: nothing printed, the note starts with no blank line before it."""
    return "\n" if printed else ""


async def _fit(nc: Client, payload: bytes, headers: dict[str, str]) -> None:
    """A request over the server's max_payload, headers included, is the user's to shorten:
    `nc` closed, ValueError (exit 2), in the words of the client's RequestTooLarge, which
    ask --stream gets."""
    size = message_bytes(payload, headers)
    if size > nc.max_payload:
        await nc.close()
        raise ValueError(
            f"the request is {size} bytes with its headers, over the NATS server's max_payload "
            f"of {nc.max_payload}: shorten the prompt"
        )


def _struck(text: str) -> str:
    """`text` struck through (U+0336 after each character), cut to one line."""
    flat = " ".join(text.split())
    short = flat if len(flat) <= 60 else flat[:57] + "..."
    return "".join(c + "\u0336" for c in short)


async def _send(nc: Client, url: str, request: CompletionRequest) -> CompletionReply | None:
    """Send one request as the Python client does (an abort on Ctrl-C, heartbeats asked for,
    so a dispatcher that died is noticed within seconds, not at the timeout) and close `nc`:
    the dispatcher's answer, or None after saying why there is none."""
    try:
        return await client.Lifeline(nc).complete(request, on_progress=_show_progress)
    except client.NotPermitted as exc:  # said as it came: its role is not a client's
        print(f"lifeline: {exc.__cause__ or exc}: no dispatcher got the request", file=sys.stderr)
        return None
    except client.RequestTooLarge as exc:  # checked before anything is sent
        raise ValueError(f"{exc}: shorten the prompt") from None
    except client.LifelineError as exc:  # NoDispatcher, NoAnswer (a silence, the timeout), ...
        print(f"lifeline: {exc} ({redact_url(url)})", file=sys.stderr)
        return None
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the user gets one line
        print(
            f"lifeline: no answer from a dispatcher on {redact_url(url)} "
            f"({type(exc).__name__}); is `lifeline run` up?",
            file=sys.stderr,
        )
        return None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _show_progress(progress: Progress) -> None:
    """A heartbeat's word on a request still running (every 2 s, on stderr): how long, and
    the attempts that failed so far, as the reply's listing will name them."""
    failed = "; ".join(f"{a.target or a.provider} {_outcome(a)}" for a in progress.attempts)
    so_far = f", so far: {failed}" if failed else ""
    print(f"... {progress.elapsed_ms / 1000:.0f} s{so_far}", file=sys.stderr, flush=True)


def _faults(entries: list[str]) -> dict[str, list[str | int]]:
    """--fault flaky=429,ok -> {"flaky": [429, "ok"]}"""
    faults: dict[str, list[str | int]] = {}
    for entry in entries:
        target, sep, values = entry.partition("=")
        if not sep or not target or not values:
            raise ValueError(f"--fault {entry!r}: expected TARGET=FAULT, e.g. --fault flaky=429")
        faults[target] = [int(v) if v.isdigit() else v for v in values.split(",")]
    return faults


def _outcome(a: Attempt) -> str:
    hedge = " (hedge)" if a.hedge else ""
    if a.outcome == "ok":
        return "ok" + hedge
    if a.outcome == "skipped":
        return f"skipped:{a.reason}"
    if a.outcome == "cancelled":
        return f"cancelled:{a.reason}{hedge}"
    status = f" {a.status_code}" if a.status_code else ""
    retry = f" ({a.reason})" if a.reason else ""  # e.g. retry_budget: why it was not retried
    return f"{a.error_type}{status}{'->' + a.next if a.next else ''}{retry}{hedge}"


def _print_reply(reply: CompletionReply) -> None:
    """The answer (its text and tool calls) on stdout; everything about it (who served it,
    the attempts, ids, an error) on stderr, so `lifeline ask ... > answer.txt` keeps the
    answer alone."""

    def note(line: str = "") -> None:
        print(line, file=sys.stderr)

    if reply.status == "ok":
        # A streamed answer was printed as it came; a tool call's empty text is no line.
        if reply.content is not None and (reply.content or not reply.tool_calls):
            print(reply.content)
        for call in reply.tool_calls or ():
            print(f"tool call {call.id}: {call.name}({call.arguments})")
        sys.stdout.flush()
        if reply.finish_reason is not None:
            note(f"finish: {reply.finish_reason}")
        template = f", template {reply.template}" if reply.template else ""
        note(
            f"served by {reply.target or reply.provider} "
            f"({reply.provider}, {reply.model}{template}) in {reply.latency_ms:.1f} ms"
        )
    else:
        assert reply.error is not None
        note(f"error: {reply.error.type}: {reply.error.message}")
    if reply.attempts:
        note("attempts:")
        for i, a in enumerate(reply.attempts, 1):
            name = (a.target or a.provider) + (f" (retry {a.retry})" if a.retry else "")
            note(f"  {i}. {name:<24} {a.model:<20} {_outcome(a):<26} {a.latency_ms:8.1f} ms")
            if a.message:
                note(f"     {a.message}")
    if reply.stream is not None:
        ttft = f"{reply.stream.ttft_ms:.1f} ms" if reply.stream.ttft_ms is not None else "-"
        note(
            f"streamed {_count(reply.stream.chunks, 'chunk')}, first after {ttft}, "
            f"{_count(reply.stream.resets, 'reset')}"
        )
    note(f"id {reply.id}  trace {reply.trace_id or '-'}")


async def _client(nats_opts: natsopts.NatsOptions, name: str) -> Client | None:
    """A short-lived client connection, or None after saying why there is none."""
    try:
        return await connect(nats_opts, name, wait_for_server=False)
    except NatsUnreachable as exc:
        print(f"lifeline: {exc}", file=sys.stderr)
        return None


async def cmd_status(args: argparse.Namespace) -> int:
    nats_opts = _nats_options(args)
    url = nats_opts.shown  # fit to print
    if args.bucket is None:
        args.bucket = _config_or_default(args).dispatcher.health_bucket
    nc = await _client(nats_opts, "lifeline-status")
    if nc is None:
        return 1
    try:
        entries = await read_bucket(nc, args.bucket, args.timeout)
    except nats.js.errors.BucketNotFoundError:
        print(
            f"lifeline: no bucket {args.bucket} on {redact_url(url)}: no dispatcher has shared "
            "its health there yet. Start one (`lifeline run` or `lifeline dispatcher`), "
            "or pass --bucket",
            file=sys.stderr,
        )
        return 1
    except BucketTooSlow as exc:
        print(
            f"lifeline: bucket {args.bucket} on {redact_url(url)} {exc}: a slow or lossy link, "
            "or a JetStream under strain; ask again, or give it longer with --timeout",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - nats-py: no JetStream answers with several types
        print(
            f"lifeline: cannot read bucket {args.bucket} on {redact_url(url)} "
            f"({jetstream.hint(exc, 1)}). Without it each dispatcher keeps its own breaker view",
            file=sys.stderr,
        )
        return 1
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    view = merge_status(entries)
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
    else:
        _print_status(view, args.bucket, redact_url(url))
    return 0


def _print_status(view: dict[str, Any], bucket: str, url: str) -> None:
    now_ms = time.time() * 1000
    dispatchers = view["dispatchers"]
    who = ", ".join(f"{d['host']}/{d['id']}" for d in dispatchers) or (
        f"none in the last {STALE_AFTER_S:g} s"  # a dispatcher's stats older are left out
    )
    counted = f"{len(dispatchers)} dispatcher{'' if len(dispatchers) == 1 else 's'}"
    _say(f"bucket {bucket} on {url}: {counted} reporting ({who})")
    for d in dispatchers:
        # Its stats document is capped: the quietest closed targets were left out.
        if d.get("omitted"):
            _say(
                f"  {d['host']}/{d['id']} left out {d['omitted']} quiet target(s) "
                "to keep its figures small"
            )
    if not view["targets"]:
        _say("no target has been called yet")
        return
    _say(
        f"\n{'PROVIDER:MODEL':<28} {'BREAKER':<10} {'CALLS/60s':>9} {'SUCCESS':>8} "
        f"{'CANCELLED':>9} {'P50':>10} {'P95':>10} {'FIRST P50':>10} {'FIRST P95':>10} "
        f"{'SKIPPED':>8}"
    )
    for label, t in sorted(view["targets"].items()):
        answered = t["ok"] + t["failed"]  # a cancelled call is no success and no failure
        success = f"{100 * t['ok'] / answered:.1f}%" if answered else "-"
        p50, p95, first_p50, first_p95 = (
            _ms(t[figure])
            for figure in ("p50_ms", "p95_ms", "first_chunk_p50_ms", "first_chunk_p95_ms")
        )  # first chunks: of its streams, "-" for a target that has not streamed
        state = t["state"].split(" ")[0]
        _say(
            f"{label:<28} {state:<10} {answered + t['cancelled']:>9} {success:>8} "
            f"{t['cancelled']:>9} {p50:>10} {p95:>10} {first_p50:>10} {first_p95:>10} "
            f"{t['skipped']:>8}"
        )
        if t["state"] != "closed" and t["reason"]:
            left_s = (t["until_unix_ms"] - now_ms) / 1000
            until = (
                f"; cooldown ends in {left_s:.0f} s"
                if left_s > 0 and state == "open"
                else ("; cooldown over: the next call probes it" if state == "open" else "")
            )
            _say(f"{'':<28} \u2514 {t['reason']}{until}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


async def cmd_gateway(args: argparse.Namespace) -> int:
    if args.max_connections is not None and args.max_connections < 1:
        raise ValueError(f"--max-connections must be at least 1, not {args.max_connections}")
    # Its routes and targets are what `model` may name; without the file, any name is sent on.
    config = None
    path = _config_path(args)
    if args.config is not None or Path(path).exists():
        config = _load_config(path)
    nats_opts = _nats_options(args, config)
    try:
        component, server = await _start_gateway(
            config, nats_opts, args.host, max(args.port, 0), args.max_connections
        )
    except OSError as exc:
        raise ValueError(f"gateway: {exc}{_listen_hint(exc)}") from None
    _print_gateway(server, config)
    lost = await _until_signalled(component.watch.wait_lost())
    if lost is not None:
        logs.say(f"{lost} lost its NATS connection for good: stopping")
    await component.stop()
    print("stopped")
    return 0 if lost is None else 1


def _listen_hint(exc: OSError) -> str:
    """What to do when `lifeline gateway` cannot listen: its port is taken or privileged, or
    its --host is no address here (one that does not resolve, or another machine's)."""
    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
        return "; try --port 0 (any free port)"
    if exc.errno == errno.EADDRNOTAVAIL or (exc.errno or 0) < 0:  # < 0: getaddrinfo's EAI_*
        return "; --host names no address of this machine: try 127.0.0.1, or 0.0.0.0 for all"
    return ""


async def _run_gateway(
    stack: Stack, config: Config, url: natsopts.NatsOptions, args: argparse.Namespace
) -> None:
    """`lifeline run`'s gateway, stopped first with the stack; a taken default port only warns."""
    if args.no_gateway:
        return
    port = 8080 if args.gateway_port is None else max(args.gateway_port, 0)
    try:
        component, server = await _start_gateway(config, url, "127.0.0.1", port)
    except OSError as exc:
        if args.gateway_port is not None:
            raise ValueError(f"gateway: {exc}; try --gateway-port -1 or --no-gateway") from None
        logs.say(
            f"gateway not started: {exc}; try --gateway-port -1 (make run GATEWAY_PORT=-1)",
            logging.WARNING,
        )
        return
    stack.components.append(component)
    _print_gateway(server, config)


async def _start_gateway(
    config: Config | None,
    url: natsopts.NatsOptions,
    host: str,
    port: int,
    max_connections: int | None = None,
) -> tuple[Component, Any]:
    from service import gateway  # the HTTP server (Starlette, uvicorn) loads for it only
    from service.config import parse_config

    settings = (config or parse_config({"providers": {"none": {"kind": "fake"}}})).dispatcher
    models = _models(config) if config is not None else None
    watch = ConnectionWatch("gateway")
    nc = await connect(url, "lifeline-gateway", watch=watch)
    server = gateway.Gateway(
        nc,
        models=models,
        keys=gateway.keys_from_env(),
        default_timeout_s=settings.default_timeout_s,
        max_body_bytes=2 * settings.max_request_bytes,
        max_connections=max_connections,
    )
    user = url.user if url.user and url.password else "<user>"  # a user alone is a token
    try:
        # Its inbox, where every answer comes, checked before it listens: refused, it would
        # be ready by every probe while each request waited out its timeout for a 504.
        must_have_subscribed(
            watch,
            "gateway",
            (await server.subscribe(),),
            f"connect it with its user's inbox prefix: set NATS_INBOX_PREFIX=_INBOX.{user} "
            "(or --nats-inbox-prefix, or [nats] inbox_prefix)",
        )
        # Where every request goes, checked too: refused, the same 504s, one per request.
        await must_be_allowed_to_publish(
            nc,
            watch,
            "gateway",
            (subjects.COMPLETE, subjects.STREAM, subjects.ABORT),
            f"`lifeline nats-config --gateways {user}` gives a gateway user what it needs",
        )
        await server.start(host, port)
    except (OSError, NatsRefused):
        watch.closing = True  # our own close: no "connection gone for good" error line
        await nc.close()
        raise
    # Found by `lifeline health` and `nats micro ls` as dispatchers and workers are; its
    # endpoint is HTTP, not a NATS subject, so it has no subject and names its URL instead.
    responder = discovery.Responder(
        nc,
        subjects.GATEWAY_SERVICE,
        "Lifeline's OpenAI-compatible HTTP gateway",
        server.endpoints,
        {"url": server.url},
    )
    try:
        await responder.start()
    except BaseException:
        await server.stop()
        watch.closing = True
        await nc.close()
        raise
    return Component("gateway", nc, server.stop, watch, responder), server


def _print_gateway(server: Any, config: Config | None) -> None:
    from service import gateway

    keys = len(server.keys)
    auth = (
        f"{_count(keys, 'API key')} from ${gateway.KEYS_ENV}"
        if keys
        else f"no API keys (${gateway.KEYS_ENV}): loopback clients only"
    )
    models = "model: a route"
    if config and config.routes:
        models += f" ({', '.join(config.routes)})"
    elif config:  # no route (a plug-in's own config): a target or provider is what to ask for
        models += f" or a provider ({', '.join([*config.targets, *config.providers])})"
    if config and config.model_aliases:
        models += f", or an alias ({', '.join(config.model_aliases)})"
    print(f"OpenAI-compatible gateway on {server.url} ({models}; {auth})", flush=True)


async def cmd_health(args: argparse.Namespace) -> int:
    nats_opts = _nats_options(args)
    expected = _expected_services(_config_path(args)) if args.expect_all else []
    nc = await _client(nats_opts, "lifeline-health")
    if nc is None:
        return 1
    try:
        # With --expect-all, an instance that answers late (a busy or paused process) is
        # waited for up to --timeout, not reported missing 0.3 s after the others answered.
        answers = await discovery.ask(nc, "STATS", timeout_s=args.timeout, expect=expected)
        cut_off = not nc.is_connected  # lost while the answers came: some may be missing
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    found, unreadable = discovery.readable_stats(answers)
    states = [discovery.instance_state(stats) for stats in found]
    states.sort(key=lambda s: (s["name"], s["host"], s["pid"], s["id"]))
    answered = {s["name"] for s in states}
    missing = [name for name in expected if name not in answered]
    if args.json:
        print(json.dumps({"instances": states, "missing": missing}, indent=2))
    else:
        _print_health(states, missing, nats_opts.shown)
    if unreadable:
        print(
            f"lifeline: left out {unreadable} answer(s) to $SRV.STATS that are not the NATS "
            "service API's shape (some other client answers there)",
            file=sys.stderr,
        )
    if cut_off:
        print(
            "lifeline: the NATS connection was lost while instances answered: some may be "
            "missing from this list; ask again",
            file=sys.stderr,
        )
    ok = states and not missing and not cut_off and all(s["ready"] for s in states)
    return 0 if ok else 1


def _expected_services(config_path: str) -> list[str]:
    """The services a whole deployment of this config runs: the dispatcher, a worker per
    provider."""
    expected = [subjects.DISPATCHER_SERVICE]
    return expected + [subjects.worker_service(n) for n in _load_config(config_path).providers]


def _count(n: int, noun: str, plural: str = "") -> str:
    """`n` and its noun, singular for 1: "1 reset", "21 chunks"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _size(size: int) -> str:
    """Bytes as a person reads them: 812 B, 4.5 KiB, 256 MiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} B"


def _print_health(states: list[dict[str, Any]], missing: list[str], url: str) -> None:
    for s in states:
        where = f"{'ready' if s['ready'] else 'NOT READY':<10} {s['name']:<28} "
        where += f"{s['host']} pid {s['pid']}  id {s['id']}  "
        if s["url"]:  # a gateway: its requests come over HTTP, not NATS
            figures = ""
            if s["connections"] is not None:  # an older gateway lists no figures
                figures = (
                    f"  in flight {s['in_flight']}, connections {s['connections']} of "
                    f"{s['max_connections']}, requests {s['requests']}, errors {s['errors']}"
                )
            _say(f"{where}serving {s['url']}{figures}")
            for problem in s["problems"]:
                _say(f"{'':<10} \u2514 {problem}")
            continue
        most = s["max_in_flight"]
        load = f"{s['in_flight']}" + (f" of {most}" if most is not None else "")
        if s.get("max_in_flight_bytes") is not None:
            load += f" ({_size(s['in_flight_bytes'] or 0)} of {_size(s['max_in_flight_bytes'])})"
        _say(
            f"{where}in flight {load}, requests {s['requests']}, errors {s['errors']}"
            + (f", expired {s['expired']} (late on arrival: see its log)" if s["expired"] else "")
        )
        for problem in s["problems"]:
            _say(f"{'':<10} \u2514 {problem}")
    for name in missing:
        _say(f"{'MISSING':<10} {name:<28} no instance answered")
    ready = sum(s["ready"] for s in states)
    if not states:
        _say(f"no Lifeline dispatcher, worker or gateway answered $SRV.STATS on {url}")
    else:
        expected = len(states) + len(missing)  # a service missing is one not ready
        _say(
            f"{ready} of {expected} ready on {url}"
            + (f", {len(missing)} missing" if missing else "")
        )


async def cmd_spec(args: argparse.Namespace) -> int:
    from service import wire_spec  # a tool: FastStream's generator loads for this command only

    files = wire_spec.generate(LOCAL_NATS)
    if args.out is None:
        sys.stdout.write(files["asyncapi.json"])
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    print(f"wrote asyncapi.json and {_count(len(files) - 1, 'JSON Schema')} to {out}")
    return 0


async def cmd_conformance(args: argparse.Namespace) -> int:
    from service import conformance  # its checks load for this command only

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per look at the server
    problem = conformance.provider_problem(args.provider) or conformance.checks_problem(
        args.check or ()
    )
    if problem is not None:
        print(f"lifeline conformance: {problem}", file=sys.stderr)
        return 2
    command = shlex.join(args.worker_command)
    print(f"starting {args.replicas} x `{command}` ...", file=sys.stderr, flush=True)
    report = await conformance.check_worker(
        args.worker_command,
        provider=args.provider,
        replicas=args.replicas,
        start_timeout_s=args.start_timeout,
        timeout_s=args.timeout,
        checks=args.check,
    )
    print(report.text())
    return 0 if report.passed else 1


async def cmd_nats_config(args: argparse.Namespace) -> int:
    from service import permissions  # names in, text out: loads for this command only

    def names(text: str) -> list[str]:
        return [name.strip() for name in text.split(",") if name.strip()]

    config = _load_config(_config_path(args))
    clients, operators = names(args.clients), names(args.operators)
    gateways = names(args.gateways)
    sys.stdout.write(permissions.server_config(config, clients, operators, gateways))
    return 0


async def cmd_check(args: argparse.Namespace) -> int:
    from service.config import ConfigError
    from workers.plugin import PluginSettings
    from workers.settings import shown_env_name

    path = _config_path(args)
    config = _load_config(path)
    # Its [nats] table as a service would use it (its files read, its ways to authenticate
    # one), with this environment's NATS_* variables where the table says nothing.
    natsopts.resolve({}, config.nats, default_url=LOCAL_NATS, source=config.source)
    for name, settings in config.providers.items():
        if isinstance(settings, PluginSettings):
            try:
                await _make_model(settings, name)
            except ValueError as exc:  # named by its file, as the loader's mistakes are
                raise ConfigError(f"{path}: {exc}") from None
        key_env = getattr(settings, "api_key_env", "")
        # Valid, but its worker would not start (it strips a key: workers/base.py).
        if key_env and not os.environ.get(key_env, "").strip():
            logs.warn(
                f"providers.{name}: {shown_env_name(key_env)} is not set here; `lifeline "
                f"worker {name}` (and `lifeline run`) need it where they run"
            )
    if config.providers and not config.routes:  # valid (a plug-in's), but no request is routed
        named = sorted({*config.targets, *config.providers})
        logs.warn(
            "no route is configured: a request must name its targets (`targets`, one of "
            f"{named}), else it gets unknown_route"
        )
    print(f"{path}: OK")
    _describe(config)
    return 0


async def _make_model(settings: PluginSettings, name: str) -> None:
    """A plug-in's model made as its worker makes it (its class imported, its settings
    checked, its constructor run), then closed: ValueError naming the provider when that
    fails, which `lifeline worker` (and `run`) would otherwise be the first to find."""
    from workers.plugin import PluginProvider

    made = PluginProvider(settings, name)
    await made.aclose()


if __name__ == "__main__":
    sys.exit(main())
