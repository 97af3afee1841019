"""Config mistakes that check-config said OK to, each found only later, at run time: the
loader now names the key and says what to do."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest
from helpers import LIFELINE, cli_env, config, fake, spawn_lifeline, wait_for_line

from service.config import ConfigError, parse_config


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def with_template(**template: str) -> dict[str, Any]:
    data = config({"p": fake()}, routes={"r": {"targets": ["t"]}})
    data["templates"] = {"terse": template}
    data["targets"] = {"t": {"provider": "p", "template": "terse"}}
    return data


def chain(*targets: Any, **tables: Any) -> dict[str, Any]:
    return {
        **config({"p": fake(), "q": fake()}, routes={"r": {"targets": list(targets)}}),
        **tables,
    }


# ---- prompt templates ------------------------------------------------------------------


def test_a_misspelt_placeholder_is_refused_naming_the_ones_its_field_fills():
    """{sytem} went to the provider as written, and the request's own system prompt was
    dropped without a word."""
    assert error(with_template(system="Be brief. {sytem}")) == (
        "templates.terse: `system` has {sytem}, not a placeholder it fills ({system}, "
        "{previous_errors}): did you mean {system}? (for braces sent as written, put a space "
        "inside: { sytem })"
    )


@pytest.mark.parametrize(
    ("template", "wanted"),
    [
        ({"system": "{input}"}, "`system` has {input}, not a placeholder it fills ({system}, "),
        (
            {"user": "{input} {system}"},
            "`user` has {system}, not a placeholder it fills ({input}, ",
        ),
        ({"system": "Be brief. {System}"}, "did you mean {system}?"),
        ({"user": "{input} ({previous_error})"}, "did you mean {previous_errors}?"),
    ],
)
def test_a_placeholder_of_the_other_field_or_a_near_miss_is_refused(template, wanted):
    message = error(with_template(**template))
    assert message.startswith("templates.terse: ") and wanted in message, message


def test_braces_around_anything_but_a_bare_name_are_still_sent_as_written():
    text = 'Answer as {"answer": ...}, {a, b} or { name }. {system}'
    parsed = parse_config(with_template(system=text, user="{input} {{input}}"))
    assert parsed.templates["terse"].system == text


# ---- one target twice in a chain -------------------------------------------------------


@pytest.mark.parametrize(
    ("targets", "where", "name", "first"),
    [
        (["p", "q", "p"], "routes.r.targets[2]", "p", "targets[0]"),
        (["p", {"provider": "p"}], "routes.r.targets[1]", "p", "targets[0]"),
        ([{"group": ["p", "q"]}, "q"], "routes.r.targets[1]", "q", "targets[0].group[1]"),
        (["q", {"group": ["p", "q"]}], "routes.r.targets[1].group[1]", "q", "targets[0]"),
    ],
)
def test_a_chain_naming_one_target_twice_is_refused_pointing_at_retries(
    targets, where, name, first
):
    """It called the target again as a fallback: at once, whatever its retry_on and backoff,
    and outside the route's retry budget."""
    assert error(chain(*targets)) == (
        f"{where}: target {name!r} is already in this chain ({first}); list it once, and for "
        "more calls to it give it `retries` (a second entry calls it again at once, past its "
        "retry_on, its backoff and the route's retry budget)"
    )


def test_a_default_chain_naming_one_target_twice_is_refused_too():
    message = error(chain("p", fallbacks={"context_length": ["q", "q"]}))
    assert message.startswith("fallbacks.context_length[1]: target 'q' is already in this chain ")


def test_one_provider_twice_shaped_differently_and_one_target_in_two_chains_are_taken():
    parsed = parse_config(
        {
            **chain(
                "p",
                {"provider": "p", "max_tokens": 4096},
                {"provider": "p", "model": "other"},
                {"provider": "p", "name": "p-again"},
            ),
            "fallbacks": {"context_length": ["p"]},
        }
    )
    assert [t.name for t in parsed.routes["r"].targets] == ["p", "p", "p:other", "p-again"]


# ---- an empty model --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (chain({"provider": "p", "model": ""}), "routes.r.targets[0].model"),
        ({**chain("t"), "targets": {"t": {"provider": "p", "model": " "}}}, "targets.t.model"),
    ],
)
def test_an_empty_model_on_a_target_is_refused(data, key):
    """It was sent to the provider as the model "" (every call a bad_request), while replies
    and the breaker named the provider's own model."""
    assert error(data) == (
        f"{key}: an empty name calls no model: name one, or drop `model` for provider p's own "
        "(fake-1)"
    )


def test_an_empty_model_in_a_request_s_target_is_refused_too():
    from schemas.wire import TargetSpec

    parsed = parse_config(chain("p"))
    with pytest.raises(ValueError, match="an empty name calls no model"):
        parsed.resolve_target(TargetSpec(provider="p", model=""))


# ---- integers --------------------------------------------------------------------------

BIG = 10**30


@pytest.mark.parametrize(
    ("table", "value", "key", "number"),
    [
        ("dispatcher", {"max_in_flight": BIG}, "dispatcher.max_in_flight", BIG),
        ("jobs", {"max_deliver": 2**63}, "jobs.max_deliver", 2**63),
        ("breaker", {"min_requests": -BIG}, "breaker.min_requests", -BIG),
        ("providers", {"p": fake(max_in_flight=BIG)}, "providers.p.max_in_flight", BIG),
        (
            "routes",
            {"r": {"targets": [{"provider": "p", "seed": BIG}]}},
            "routes.r.targets[0].seed",
            BIG,
        ),
    ],
)
def test_an_integer_past_toml_s_64_bits_is_refused_naming_its_key(table, value, key, number):
    """TOML integers are 64-bit, but Python's reader takes any: max_in_flight = 10**30 was
    taken, as no limit at all."""
    data = config({"p": fake()})
    data[table] = value
    assert error(data) == (
        f"{key}: {number} is outside the 64-bit integers TOML holds "
        "(-9223372036854775808 to 9223372036854775807): write a smaller number"
    )


def test_the_largest_toml_integer_is_taken():
    parsed = parse_config(config({"p": fake()}, max_in_flight=2**63 - 1))
    assert parsed.dispatcher.max_in_flight == 2**63 - 1


def test_check_config_lists_every_oversized_integer_and_one_of_thousands_of_digits(tmp_path):
    path = tmp_path / "lifeline.toml"
    path.write_text(
        '[providers.p]\nkind = "fake"\n[dispatcher]\nmax_in_flight = 1' + "0" * 30 + "\n"
        "[jobs]\nin_flight = 1" + "0" * 30 + "\n"
    )
    done = check_config(path)
    assert done.returncode == 2, done.stdout
    assert done.stderr.splitlines()[1:] == [
        f"  {key}: 1{'0' * 30} is outside the 64-bit integers TOML holds "
        "(-9223372036854775808 to 9223372036854775807): write a smaller number"
        for key in ("dispatcher.max_in_flight", "jobs.in_flight")
    ]
    path.write_text('[providers.p]\nkind = "fake"\n[dispatcher]\nmax_in_flight = ' + "9" * 5000)
    done = check_config(path)
    assert done.returncode == 2 and done.stderr.startswith(f"lifeline: {path}: not valid TOML: ")
    assert "set_int_max_str_digits" not in done.stderr and "64-bit" in done.stderr, done.stderr


# ---- the largest request ---------------------------------------------------------------


def test_max_request_bytes_above_the_largest_nats_payload_is_refused():
    """nats-server takes no max_payload over 2**31 - 1 bytes ("max_payload value is too big"),
    so no larger request ever arrives; but the HTTP gateway reads bodies up to twice this
    limit, and 10**30 let it read any body into memory."""
    assert error(config({"p": fake()}, max_request_bytes=2**31)) == (
        "dispatcher.max_request_bytes: Expected `int` <= 2147483647"
    )
    parse_config(config({"p": fake()}, max_request_bytes=2**31 - 1))


# ---- a breaker's window ----------------------------------------------------------------


ROUTE_WINDOW = config({"p": fake()}, routes={"r": {"targets": ["p"], "breaker": {"window_s": 0.5}}})


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({**chain("p"), "breaker": {"window_s": 0.000001}}, "breaker.window_s"),
        (ROUTE_WINDOW, "routes.r.breaker.window_s"),
        (
            chain({"provider": "p", "breaker": {"window_s": 0.5}}),
            "routes.r.targets[0].breaker.window_s",
        ),
    ],
)
def test_a_breaker_window_under_a_second_is_refused(data, key):
    """The breaker counts calls in 1-second slots: a window of a microsecond was counted as
    the current second, while check-config said "50% of 10+ calls in 1e-06 s"."""
    message = error(data)
    assert message.startswith(f"{key}: ") and message.endswith(
        "s is shorter than the 1 s slots the breaker counts calls in (it would count the "
        "current one only): set 1 to 300"
    ), message
    assert parse_config({**chain("p"), "breaker": {"window_s": 1}}).breaker == {"window_s": 1}


# ---- a request's timeouts --------------------------------------------------------------


def test_timeouts_under_a_millisecond_are_refused():
    """A request with less than 1 ms left is past its deadline: every request without its own
    timeout_s was answered deadline_exceeded, no provider asked."""
    message = error(config({"p": fake()}, default_timeout_s=0.0005))
    assert message == "dispatcher.default_timeout_s: Expected `float` >= 0.001"
    message = error(config({"p": fake()}, max_timeout_s=0.0005))
    assert message == "dispatcher.max_timeout_s: Expected `float` >= 0.001"
    parse_config(config({"p": fake()}, default_timeout_s=0.001, max_timeout_s=0.001))


# ---- how long JetStream keeps audit events and results ---------------------------------


def test_audit_and_results_keep_times_jetstream_refuses_are_refused():
    """The audit stream drops a job's audit event published again within 600 s, and JetStream
    makes no stream that keeps its messages for less than its duplicate window, nor less than
    0.1 s: check-config said OK, and the stream or the results bucket was never made."""
    from service.audit import DEDUP_WINDOW_S

    data = {**config({"p": fake()}), "audit": {"max_age_s": 60}}
    assert error(data) == f"audit.max_age_s: Expected `float` >= {DEDUP_WINDOW_S}"
    data = {**config({"p": fake()}), "jobs": {"results_ttl_s": 0.05}}
    assert error(data) == "jobs.results_ttl_s: Expected `float` >= 0.1"


async def test_jetstream_makes_the_audit_stream_and_results_bucket_at_the_shortest_times(
    nats_url,
):
    from service.audit import ensure_audit_stream
    from service.jobstore import ensure_jobs

    shortest = parse_config(
        {
            **config({"p": fake()}),
            "audit": {"max_age_s": 600},
            "jobs": {"results_ttl_s": 1, "ack_wait_s": 1, "dedup_window_s": 1},
        }
    )
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        assert await ensure_audit_stream(js, shortest.audit) is None
        await ensure_jobs(js, shortest.jobs)
        assert (await js.stream_info("KV_lifeline_results")).config.max_age == 1
    finally:
        await nc.close()


def test_results_kept_shorter_than_a_jobs_redelivery_wait_are_refused():
    """A job whose dispatcher stored its result and died before acking it comes back within
    jobs.ack_wait_s and is answered from the stored result; kept shorter than that, the result
    was gone and the job called its provider a second time."""
    with pytest.raises(ConfigError, match=r"results_ttl_s \(10\) is under ack_wait_s \(30\)"):
        parse_config({**config({"a": fake()}), "jobs": {"results_ttl_s": 10}})
    parse_config(
        {
            **config({"a": fake()}),
            "jobs": {"results_ttl_s": 10, "ack_wait_s": 10, "dedup_window_s": 10},
        }
    )


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"routes": {"r": {"targets": ["p"], "fallback_on": ["rate_limt"]}}}, "fallback_on[0]"),
        (
            {"routes": {"r": {"targets": [{"provider": "p", "retry_on": ["rate_limt"]}]}}},
            "retry_on",
        ),
        ({"breaker": {"trip_on": ["timeout", "rate_limt"]}}, "trip_on[1]"),
    ],
    ids=["fallback_on", "retry_on", "trip_on"],
)
def test_a_misspelt_error_kind_gets_a_did_you_mean_as_a_misspelt_key_does(table, key):
    """An unknown key said `did you mean 'breaker'?`, an unknown error kind only listed all
    twelve, the one meant among them."""
    message = error({**config({"p": fake()}, routes={"r": {"targets": ["p"]}}), **table})
    assert key in message
    assert "unknown error kind 'rate_limt' (did you mean 'rate_limit'?)" in message, message


def test_an_error_kind_near_none_still_lists_the_known_ones():
    target = {"provider": "p", "retry_on": ["zzz"]}
    message = error(config({"p": fake()}, routes={"r": {"targets": [target]}}))
    assert "unknown error kind 'zzz' (known: timeout, rate_limit," in message, message


# ---- a provider's key of another kind ------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "says"),
    [
        (
            {"kind": "openai", "model": "m", "deployment": "d"},
            (
                "providers.p.deployment: unknown key (kind openai has none; kind azure_openai "
                "takes it)"
            ),
        ),
        (
            {"kind": "fake", "api_key_env": "KEY"},
            (
                "providers.p.api_key_env: unknown key (kind fake has none; kinds openai, "
                "azure_openai, anthropic take it)"
            ),
        ),
        (  # openai's and anthropic's URL key named Azure's: its own is endpoint
            {"kind": "azure_openai", "deployment": "d", "base_url": "https://r.example"},
            (
                "providers.p.base_url: unknown key (kind azure_openai takes its URL as "
                "'endpoint': https://<resource>.openai.azure.com)"
            ),
        ),
        (
            {"kind": "openai", "model": "m", "endpoint": "https://r.example"},
            "providers.p.endpoint: unknown key (kind openai takes its URL as 'base_url')",
        ),
        ({"kind": "fake", "latency": 3}, "unknown key (did you mean 'latency_ms'?)"),
        ({"kind": "fake", "colour": 3}, "providers.p.colour: unknown key (check its spelling)"),
    ],
    ids=[
        "azure-key-on-openai",
        "api-key-on-fake",
        "base-url-on-azure",
        "endpoint-on-openai",
        "misspelt",
        "nowhere",
    ],
)
def test_a_key_of_another_kind_says_which_kind_takes_it(provider, says):
    """A table copied from one kind to another said "check its spelling" of a key spelt
    right: `deployment` is Azure's, and an openai provider has none."""
    message = error(config({"p": provider}, routes={"r": {"targets": ["p"]}}))
    assert says in message, message


@pytest.mark.parametrize("key", ["retries", "timeout_s", "temperature"])
def test_a_target_s_key_on_a_route_says_to_give_it_to_the_targets(key):
    """`retries = 2` under [routes.default] said "check its spelling": it is spelt right, and
    it is a target's."""
    message = error(config({"p": fake()}, routes={"r": {"targets": ["p"], key: 1}}))
    assert message.startswith(
        f"routes.r.{key}: unknown key (a route has none; a target takes it: targets = "
        f'[{{ provider = "...", {key} = ... }}])'
    ), message


# ---- a table or key given twice ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            '[providers.p]\nkind = "fake"\n\n[providers.p]\nkind = "fake"\n',
            "[providers.p] is declared twice (at line 4, column 13): merge the two",
        ),
        (
            '[providers.p]\nkind = "fake"\nkind = "fake"\n',
            "a key set twice (at line 3, column 14): keep one",
        ),
    ],
    ids=["table", "key"],
)
def test_a_table_or_key_given_twice_says_so_in_toml_s_words(tmp_path, text, says):
    """tomllib's own words: "Cannot declare ('providers', 'p') twice", a Python tuple, and
    "Cannot overwrite a value", which names no key."""
    path = tmp_path / "twice.toml"
    path.write_text(text)
    checked = check_config(path)
    assert checked.returncode == 2, checked
    assert f"{path}: not valid TOML: {says}" in checked.stderr, checked.stderr


def test_a_provider_without_kind_is_told_to_set_one():
    """It said `providers.p.kind: expected one of fake, ..., got None`: Python's None."""
    message = error(config({"p": {"model": "m"}}, routes={"r": {"targets": ["p"]}}))
    assert message.startswith(
        "providers.p.kind: missing: set it to one of fake, openai, azure_openai, anthropic, "
        "python (the installed ones)"
    ), message


# ---- an API key the worker will not take --------------------------------------------------


@pytest.mark.parametrize("value", [None, "", " \n"], ids=["unset", "empty", "blank"])
def test_check_config_warns_of_an_api_key_the_worker_would_refuse(tmp_path, value):
    """A key of only blanks (a secret file's empty line) passed check-config without a word,
    and `lifeline worker` then refused it: "provider needs an API key"."""
    path = tmp_path / "real.toml"
    path.write_text('[providers.p]\nkind = "openai"\nmodel = "m"\napi_key_env = "P_KEY"\n')
    env = {k: v for k, v in cli_env().items() if k != "P_KEY"}
    if value is not None:
        env["P_KEY"] = value
    checked = subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert "warning: providers.p: $P_KEY is not set here" in checked.stderr, checked.stderr


@pytest.mark.parametrize(
    ("hedge", "key"), [("hedge_after_ms = 800", "hedge_after_ms"), ('hedge = "p95"', "hedge")]
)
def test_check_config_warns_of_a_hedge_on_a_route_of_one_target(tmp_path, hedge, key):
    """A hedge starts the chain's next target; on a route of one it never started, and
    check-config said nothing. A route of two, or of one group, is not warned of."""
    path = tmp_path / "hedged.toml"
    path.write_text(
        '[providers.a]\nkind = "fake"\n[providers.b]\nkind = "fake"\n'
        f'[routes.alone]\ntargets = ["a"]\n{hedge}\n'
        f'[routes.pair]\ntargets = ["a", "b"]\n{hedge}\n'
        f'[routes.grouped]\ntargets = [{{group = ["a", "b"]}}]\n{hedge}\n'
    )
    checked = subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    warnings = [line for line in checked.stderr.splitlines() if line.startswith("warning:")]
    said = (
        f"warning: routes.alone.{key}: the route has one target, so no hedge can start beside "
        "it; add a second target (or a group), or drop it"
    )
    assert warnings == [said], checked.stderr


@pytest.mark.parametrize(
    "command",
    [["dispatcher"], ["run", "--port", "-1", "--no-gateway", "--quiet"]],
    ids=["dispatcher", "run"],
)
def test_a_command_that_loads_the_config_warns_of_its_useless_hedge_once(
    tmp_path, nats_url, command
):
    """check-config warned of a hedge on a route of one plain target; `lifeline run` and
    `lifeline dispatcher`, started with that config, said nothing: the hedge never started."""
    path = tmp_path / "hedged.toml"
    path.write_text(
        '[providers.a]\nkind = "fake"\n[routes.alone]\ntargets = ["a"]\nhedge_after_ms = 5\n'
    )
    url = ["--nats-url", nats_url] if command == ["dispatcher"] else []
    proc = spawn_lifeline(
        *command, "--config", str(path), *url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    said: list[str] = []
    try:
        if command == ["dispatcher"]:
            _, said = wait_for_line(proc, "dispatcher serving", stream=proc.stderr)
        else:
            wait_for_line(proc, "dispatcher ready")
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=30)
    stderr = "".join(said) + rest
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    said = (
        "warning: routes.alone.hedge_after_ms: the route has one target, so no hedge can start "
        "beside it; add a second target (or a group), or drop it"
    )
    assert warnings == [said], stderr


def test_check_config_refuses_a_base_url_with_user_info_beside_a_key_as_the_worker_does(tmp_path):
    """`lifeline worker` refused an openai base_url with user info beside its API key (httpx
    would send the user info as Basic auth in the key's place); check-config said OK. Without a
    key (api_key_env = ""), the user info is the credential, and both take it."""
    path = tmp_path / "proxied.toml"
    url = "https://proxy:Proxy-PW-31337@proxy.example/v1"
    path.write_text(f'[providers.p]\nkind = "openai"\nmodel = "m"\nbase_url = "{url}"\n')
    checked = check_config(path)
    assert checked.returncode == 2, checked.stdout
    assert "providers.p: base_url holds user info (user:password@)" in checked.stderr
    assert "Proxy-PW-31337" not in checked.stderr
    path.write_text(
        f'[providers.p]\nkind = "openai"\nmodel = "m"\nbase_url = "{url}"\napi_key_env = ""\n'
    )
    assert check_config(path).returncode == 0
