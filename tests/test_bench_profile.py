"""`make bench-profile`'s reading of py-spy's collapsed stacks, on made-up stacks: which
samples count (the event-loop thread's, busy) and where each goes. Nothing here is timed."""

from __future__ import annotations

from tests.bench.profile import category, shares_of

SITE = "/work/.venv/lib/python3.11/site-packages"
ROOT = "/work/main"
MAIN = f"<module> (<string>:1);child_main ({ROOT}/tests/bench/harness.py:64)"


def test_a_sample_goes_where_its_deepest_python_frame_is_but_writes_and_msgspec_apart():
    engine = f"Engine.serve ({ROOT}/service/engine.py:173)"
    assert category([MAIN, engine, f"Router.plan ({ROOT}/service/routing.py:349)"]) == "own"
    # C under Lifeline's code counts as that code; a socket write or msgspec counts apart
    assert category([MAIN, engine, "PyDict_SetItem (libpython3.11.so.1.0)"]) == "own"
    publish = f"FastPath.publish ({ROOT}/service/natsio.py:500)"
    assert category([MAIN, publish, "uv__try_write (stream.c:813)", "writev (libc.so.6)"]) == (
        "writes"
    )
    assert category([MAIN, engine, f"Encoder.encode ({SITE}/msgspec/_core.so)"]) == "msgspec"
    assert category([MAIN, publish]) == "natsio"
    assert category([MAIN, f"Health.record ({ROOT}/service/health.py:532)"]) == "fallback"
    assert category([MAIN, f"start ({SITE}/opentelemetry/sdk/trace/__init__.py:9)"]) == "spans"
    assert category([MAIN, f"Task.step ({SITE}/../asyncio/tasks.py:1)"]) == "loop"
    assert category([MAIN, f"FakeProvider.complete ({ROOT}/workers/fake.py:90)"]) == "fake"
    assert category([MAIN, f"loads ({SITE}/json/decoder.py:1)"]) == "rest"


def test_only_the_busy_event_loop_thread_is_counted(tmp_path):
    engine = f"Engine.serve ({ROOT}/service/engine.py:173)"
    collapsed = tmp_path / "profile.txt"
    collapsed.write_text(
        "\n".join(
            [
                f"{MAIN};{engine} 30",
                f"{MAIN};{engine};writev (libc.so.6) 10",
                f"{MAIN};uv_run (core.c:464);uv__io_poll (linux.c:1452);epoll_pwait (libc.so.6) 500",
                "Thread.run (threading.py:982);Condition.wait (threading.py:331) 400",
            ]
        )
        + "\n"
    )
    shares = shares_of(collapsed)
    assert shares["own"] == 0.75 and shares["writes"] == 0.25
    assert sum(shares.values()) == 1.0
