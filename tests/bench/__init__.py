"""Lifeline's benchmark suite: a tool run with `python -m tests.bench`, not a pytest suite.

It measures what Lifeline costs on top of NATS request/reply, against a plain nats-py
relay doing the same hop, plus time to fallback, memory per in-flight request, scaling
over dispatcher processes, a concurrency check and p99 with a slow primary, with and
without hedging. Modules:

    __main__   the command line (`--help` explains every case)
    cases      the cases, the Lifeline config they use, and how a run goes
    servers    the server-side processes: responder, relay, dispatcher, worker
    loadgen    the load generator process (closed loop and bursts)
    harness    spawning, driving and always reaping the processes; /proc readers
    report     medians, Markdown tables, targets, results.json and results.md
    regression this run against the README's figures (reference.toml); --check fails on it

No file here is named test_*.py, so pytest does not collect any of it.
"""
