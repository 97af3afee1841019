// A Lifeline provider worker in Node.js: the wire protocol with nothing but a NATS client.
// Its "model" echoes the last user message; swap answer() for a real API call and keep the rest.
//
//   npm ci --prefix workers/examples/node
//   LIFELINE_PROVIDER=node-echo NATS_URL=nats://127.0.0.1:4222 node workers/examples/node/worker.mjs
//
// Environment: LIFELINE_PROVIDER (default node-echo), LIFELINE_MODEL (default node-echo-1),
// NATS_URL (default nats://127.0.0.1:4222; a comma-separated list for a cluster),
// LIFELINE_TEST_MODE=1 to obey the conformance kit's "lifeline-test:" directives, and
// LIFELINE_ECHO_DELAY_MS, how long each call takes (default 0), as a real API call does: to
// watch a deadline or a cancel cut one short.
//
// The protocol (workers/runtime.py is the reference implementation; the messages are in
// schemas/wire.py, the subject and header names in schemas/subjects.py):
//   - serve llm.provider.<name> in queue group lifeline-provider-<name> (replicas share the load);
//   - the body is a JSON ProviderRequest ({id, messages, model?, ...}); the reply, on the message's
//     reply subject, is one JSON ProviderOk {"status":"ok",...} or ProviderFailure {"status":"error",...};
//   - header Lifeline-Deadline-Ms (Unix ms): after it nobody waits, so never reply after it;
//   - llm.cancel.<name> (every replica, no queue group) names a Lifeline-Attempt-Id to abandon;
//   - header Lifeline-Stream-To: publish the text there first, in order, as bare UTF-8 chunks.
import { setTimeout as sleep } from "node:timers/promises";
import { connect } from "nats";

const NAME = process.env.LIFELINE_PROVIDER || "node-echo";
const MODEL = process.env.LIFELINE_MODEL || "node-echo-1";
const SERVERS = (process.env.NATS_URL || "nats://127.0.0.1:4222").split(",").map((s) => s.trim());
const TEST_MODE = process.env.LIFELINE_TEST_MODE === "1";
const DELAY_MS = Number(process.env.LIFELINE_ECHO_DELAY_MS) || 0;

const DEADLINE_MS = "Lifeline-Deadline-Ms";
const ATTEMPT_ID = "Lifeline-Attempt-Id";
const STREAM_TO = "Lifeline-Stream-To";

// HTTP status -> error kind, as schemas/errors.py classify_status maps it (its KINDS table).
const KIND_BY_STATUS = { 408: "timeout", 429: "rate_limit", 401: "auth", 403: "auth", 402: "quota" };
const classifyStatus = (status) =>
  KIND_BY_STATUS[status] ?? (status >= 500 ? "server_error" : "bad_request");

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();
const running = new Map(); // Lifeline-Attempt-Id -> AbortController of the request running it
const inFlight = new Set(); // promises of the requests being answered, awaited on shutdown

// A ProviderFailure. JSON.stringify leaves out fields that are undefined, as the wire wants.
const failure = (kind, message, status_code, retry_after_s) =>
  ({ status: "error", kind, message, status_code, retry_after_s });

// A message's text: its string content, or its text parts joined (image parts left out).
function textOf(message) {
  const c = message.content;
  if (typeof c === "string") return c;
  if (!Array.isArray(c)) return ""; // null: an assistant message with only tool calls
  return c.filter((p) => p?.type === "text" && typeof p.text === "string").map((p) => p.text).join("");
}
const words = (text) => text.split(/\s+/).filter(Boolean).length;

// maxReconnectAttempts -1: ride out a nats-server restart, as Lifeline's own workers do.
const nc = await connect({
  servers: SERVERS, name: `lifeline-worker-${NAME}`, maxReconnectAttempts: -1,
});

const sub = nc.subscribe(`llm.provider.${NAME}`, {
  queue: `lifeline-provider-${NAME}`,
  callback: (err, msg) => {
    if (err) return console.error(`node worker ${NAME}: ${err.message}`);
    const p = handle(msg).finally(() => inFlight.delete(p));
    inFlight.add(p);
  },
});
nc.subscribe(`llm.cancel.${NAME}`, {
  // The body is the attempt id; the replica running it stops, and nobody gets a reply.
  callback: (err, msg) => err || running.get(fromUtf8.decode(msg.data))?.abort(),
});

// Answer one request. Never throws: a worker that dies on a bad message stops serving everyone.
async function handle(msg) {
  const started = performance.now();
  const header = msg.headers?.get(DEADLINE_MS) || ""; // nats.js: "" when absent
  const deadline = /^\d{1,20}$/.test(header) ? Number(header) : NaN; // NaN: none, or malformed
  if (deadline <= Date.now()) return; // the dispatcher has moved on: the work would be wasted
  const aborted = new AbortController(); // aborted by a cancel message or by the deadline
  const left = deadline - Date.now();
  // No timer without a deadline (NaN), nor for one weeks away: Node fires those at once.
  const timer = left < 2 ** 31 - 1 ? setTimeout(() => aborted.abort(), left) : undefined;
  const attemptId = msg.headers?.get(ATTEMPT_ID) || "";
  if (attemptId) running.set(attemptId, aborted);
  try {
    const reply = await answer(msg, aborted.signal);
    if (aborted.signal.aborted || !msg.reply) return; // cancelled or too late: no reply at all
    send(msg.reply, { ...reply, latency_ms: performance.now() - started });
  } catch (err) {
    if (aborted.signal.aborted) return; // e.g. the AbortError of a sleep cut short
    console.error(`node worker ${NAME}: bug while answering:`, err);
    if (msg.reply) send(msg.reply, failure("server_error", `worker ${NAME} failed: ${err.name}`));
  } finally {
    clearTimeout(timer);
    if (running.get(attemptId) === aborted) running.delete(attemptId);
  }
}

// The reply must fit the server's max_payload, or the server refuses it and nobody hears back.
function send(subject, reply) {
  let data = utf8.encode(JSON.stringify(reply));
  const max = nc.info?.max_payload ?? 1024 * 1024;
  if (data.length > max) {
    const why = `${NAME}'s reply of ${data.length} bytes is over the server's max_payload (${max})`;
    data = utf8.encode(JSON.stringify(failure("response_too_large", why)));
  }
  try {
    nc.publish(subject, data);
  } catch (err) { // the connection is closed: nobody can be answered
    console.error(`node worker ${NAME}: reply not sent: ${err.message}`);
  }
}

// The provider call: a ProviderRequest in, a ProviderOk or ProviderFailure out.
async function answer(msg, signal) {
  let request;
  try {
    request = JSON.parse(fromUtf8.decode(msg.data));
  } catch (err) {
    return failure("bad_request", `worker ${NAME}: invalid ProviderRequest: ${err.message}`);
  }
  const valid = request && typeof request === "object" && typeof request.id === "string" &&
    Array.isArray(request.messages) && request.messages.every((m) => m && typeof m === "object");
  if (!valid) {
    const why = 'needs an "id" string and a "messages" array of objects';
    return failure("bad_request", `worker ${NAME}: invalid ProviderRequest: ${why}`);
  }
  const last = request.messages.at(-1);
  if (TEST_MODE && last?.role === "user" && typeof last.content === "string" &&
      last.content.startsWith("lifeline-test:")) {
    const directed = await testDirective(last.content.slice("lifeline-test:".length).trim(), signal);
    if (directed) return directed;
  }
  // The model's call. A real one takes the signal too (fetch(url, { signal })), so that a
  // deadline or a cancel stops it; replying nothing afterwards is handle()'s part.
  if (DELAY_MS > 0) await sleep(Math.min(DELAY_MS, 2 ** 31 - 1), undefined, { signal });
  const text = textOf(request.messages.findLast((m) => m.role === "user") ?? {});
  const ok = {
    status: "ok",
    content: text,
    model: request.model || MODEL, // the request's model, when set, wins over the worker's
    usage: { input_tokens: words(request.messages.map(textOf).join(" ")), output_tokens: words(text) },
    chunks: 0,
    finish_reason: "stop",
  };
  const streamTo = msg.headers?.get(STREAM_TO) || "";
  // Never stream onto Lifeline's own subjects or the server's: answer in one reply instead.
  if (!streamTo || streamTo.startsWith("llm.") || streamTo.startsWith("$")) return ok;
  // Word by word, each piece with the whitespace before its word: joined, they are the text.
  const pieces = text.split(/(?<=\s)(?=\S)/).filter(Boolean);
  for (const piece of pieces) {
    if (signal.aborted) return ok; // a real provider awaits each delta: stop when aborted
    nc.publish(streamTo, utf8.encode(piece));
  }
  return { ...ok, content: "", chunks: pieces.length }; // content: only what did not stream
}

// LIFELINE_TEST_MODE=1 only: the directives the conformance kit sends (workers/testmode.py has
// the spec). A failure to answer with, or null to answer as usual afterwards.
async function testDirective(directive, signal) {
  const [verb, arg, ...rest] = directive.split(/\s+/);
  if (verb === "sleep" && rest.length === 0 && number(arg) !== undefined) {
    // (Node fires a timer over 2^31-1 ms, about 24 days, at once: longer sleeps are capped.)
    await sleep(Math.min(number(arg), 2 ** 31 - 1), undefined, { signal }); // AbortError if aborted
    return null;
  }
  const status = /^\d+$/.test(arg ?? "") ? Number(arg) : 0;
  if (verb === "fail" && status >= 400 && status <= 599) {
    const why = `test mode: failing with ${status} as asked`;
    if (rest.length === 0) return failure(classifyStatus(status), why, status);
    if (rest.length === 2 && rest[0] === "retry_after" && number(rest[1]) !== undefined) {
      return failure(classifyStatus(status), why, status, number(rest[1]));
    }
  }
  const usage = "sleep <ms> | fail <status 400..599> [retry_after <seconds>]";
  return failure("bad_request", `test mode: no such directive "${directive}"; know: ${usage}`);
}
// A non-negative finite decimal (250, 0.5, 1e3), or undefined.
function number(text) {
  const ok = /^(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text ?? "") && Number.isFinite(Number(text));
  return ok ? Number(text) : undefined;
}

// SIGTERM/SIGINT: take no new requests (the queue group's other replicas get them), answer the
// ones in hand, flush the replies and close; then exit 0. At most 10 s: past that (or with no
// server to drain through) the connection is just closed.
let stopping = false;
async function stop(signal) {
  if (stopping) return;
  stopping = true;
  console.error(`node worker ${NAME}: ${signal}, draining`);
  const drained = (async () => {
    await sub.drain();
    await Promise.allSettled([...inFlight]);
    await nc.drain(); // drains the cancel subscription too, then closes
  })().catch((err) => console.error(`node worker ${NAME}: drain failed: ${err.message}`));
  await Promise.race([drained, sleep(10_000, undefined, { ref: false })]);
  if (!nc.isClosed()) await nc.close();
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));

await nc.flush(); // the server has our subscriptions: we are reachable
console.error(`node worker ${NAME} serving llm.provider.${NAME} (queue lifeline-provider-${NAME})`);
const err = await nc.closed(); // resolves when the connection is closed for good
if (err) {
  console.error(`node worker ${NAME}: connection lost: ${err.message}`);
  process.exit(1);
}
process.exit(0);
