"""The TOML config: what parses, and what a user reads when it does not (the bad key first)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import LIFELINE, USER_HELLO, cli_env, config, fake

from service.config import ConfigError, load_config, parse_config
from workers.registry import KINDS

EXAMPLE = Path(__file__).resolve().parent.parent / "lifeline.example.toml"

ISSUE_EXAMPLE = """
[providers.primary]
kind = "openai"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
timeout_s = 10
[providers.backup]
kind = "fake"
reply = "echo"
[routes.default]
targets = ["primary", "backup"]
fallback_on = ["timeout", "rate_limit", "server_error", "no_responders"]
"""


def error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return str(exc.value)


def file_error(path: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return str(exc.value)


def route(*targets: str, **settings: Any) -> dict[str, Any]:
    return {"default": {"targets": list(targets), **settings}}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lifeline.toml"
    path.write_text(text)
    return path


# ---- what parses ----------------------------------------------------------------------


def test_the_example_config_parses_and_its_default_route_shows_a_fallback():
    parsed = load_config(EXAMPLE)
    assert len(parsed.routes["default"].targets) >= 2
    assert parsed.source == str(EXAMPLE)


def test_the_documented_config_parses_without_the_api_key_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    parsed = load_config(write(tmp_path, ISSUE_EXAMPLE))
    primary = parsed.providers["primary"]
    assert (primary.kind, primary.model, primary.timeout_s) == ("openai", "gpt-4o-mini", 10)
    assert [t.name for t in parsed.routes["default"].targets] == ["primary", "backup"]
    assert parsed.routes["default"].fallback_on == {
        "timeout",
        "rate_limit",
        "server_error",
        "no_responders",
    }


def test_fallback_on_accepts_the_edges_of_the_http_error_range():
    parsed = parse_config(config({"p": fake()}, route("p", fallback_on=[400, 599, "rate_limit"])))
    assert parsed.routes["default"].fallback_on == {400, 599, "rate_limit"}


# ---- provider tables ------------------------------------------------------------------


def test_a_wrong_type_names_the_provider_key_first():
    assert error(config({"primary": fake(timeout_s="ten")})).startswith(
        "providers.primary.timeout_s: "
    )


def test_a_misspelled_provider_key_is_named_first_as_an_unknown_key():
    assert error(config({"primary": fake(colour="red")})).startswith(
        "providers.primary.colour: unknown key"
    )


@pytest.mark.parametrize("timeout_s", [0, -1, 0.0004, float("inf"), 1e10])
def test_a_provider_timeout_must_be_a_millisecond_or_more_and_finite(timeout_s):
    """Under a millisecond, which a worker's deadline header cannot carry, every call timed out."""
    assert error(config({"primary": fake(timeout_s=timeout_s)})).startswith(
        "providers.primary.timeout_s: "
    )


def test_an_unknown_kind_names_the_key_and_lists_the_known_kinds():
    message = error(config({"primary": {"kind": "gemini"}}))
    assert message.startswith("providers.primary.kind: ")
    assert "gemini" in message
    assert all(kind in message for kind in KINDS)


def test_a_provider_without_a_kind_is_refused_at_its_kind_key():
    assert error(config({"primary": {"model": "m"}})).startswith("providers.primary.kind: ")


@pytest.mark.parametrize("kind", [["fake"], {"name": "fake"}, 5])
def test_a_kind_that_is_no_string_is_refused_at_its_kind_key(kind):
    assert error(config({"primary": {"kind": kind}})).startswith("providers.primary.kind: ")


@pytest.mark.parametrize("name", ["a.b", "a b", "llm.*", "p>", "a" * 257, "p\n"])
def test_a_provider_name_that_is_not_a_subject_token_is_refused(name):
    shown = name.replace("\n", "\\n")  # a mistake is one line
    assert error(config({name: fake()})).startswith(f"providers.{shown}: ")


@pytest.mark.parametrize(
    "table, key, value",
    [
        ("dispatcher", "default_timeout_s", float("inf")),
        ("dispatcher", "max_timeout_s", 1e308),
        ("jobs", "dedup_window_s", 0.0000001),
        ("jobs", "dedup_window_s", float("inf")),
        ("jobs", "results_ttl_s", 1e10),
        ("jobs", "max_jobs", 2**64),
        ("audit", "max_age_s", float("inf")),
        ("audit", "max_bytes", 2**64),
    ],
)
def test_numbers_a_server_or_a_deadline_cannot_hold_are_refused_at_their_key(table, key, value):
    """Each passed, then broke: JetStream refused the stream for ever after (its durations are
    int64 nanoseconds), or every request without a timeout_s failed as an internal error."""
    data = config({"primary": fake()})
    data[table] = {key: value}
    assert error(data).startswith(f"{table}.{key}: ")


@pytest.mark.parametrize(
    "route, key",
    [
        ({"hedge_after_ms": float("inf")}, "routes.default.hedge_after_ms"),
        (
            {"targets": [{"provider": "primary", "ttft_s": 1e300}]},
            "routes.default.targets[0].ttft_s",
        ),
        (
            {"targets": [{"provider": "primary", "idle_s": float("inf")}]},
            "routes.default.targets[0].idle_s",
        ),
    ],
)
def test_a_duration_past_a_year_is_refused_at_its_key(route, key):
    """They were taken (check-config said "hedges after inf ms"), though the README says a
    duration is at most a year."""
    data = config({"primary": fake()})
    data["routes"] = {"default": {"targets": ["primary"], **route}}
    assert error(data).startswith(f"{key}: "), error(data)


def test_a_named_target_with_a_name_requests_cannot_use_is_refused():
    data = config({"primary": fake()})
    data["targets"] = {"a b=*": {"provider": "primary"}}
    assert error(data).startswith("targets.a b=*: ")


@pytest.mark.parametrize(
    "table, key", [("jobs", "stream"), ("audit", "stream"), ("dispatcher", "health_bucket")]
)
def test_a_stream_name_ending_in_a_line_break_is_refused(table, key):
    """A regex's $ matches before a final line break: "A\n" passed, and the server refused the
    stream for ever after (audit events never kept), or a subject crashed `lifeline run`."""
    data = config({"primary": fake()})
    data[table] = {key: "A\n"}
    assert error(data).startswith(f"{table}.{key}: ")


@pytest.mark.parametrize(
    "table, key",
    [
        ("jobs", "stream"),
        ("jobs", "results_bucket"),
        ("audit", "stream"),
        ("dispatcher", "health_bucket"),
    ],
)
def test_a_stream_or_bucket_name_with_a_dot_says_which_characters_it_takes(table, key):
    """It said "Expected `str` matching regex '^[A-Za-z0-9_-]+(?!...)$'", its line-break
    lookahead escaped twice: a regex to decode, not the characters to use."""
    data = config({"primary": fake()})
    data[table] = {key: "lifeline.prod"}
    said = error(data)
    assert said.startswith(f"{table}.{key}: ") and "regex" not in said, said
    assert "letters, digits, '_' and '-'" in said, said


def test_a_targets_timeout_above_its_providers_is_refused_naming_both():
    """The worker holds every call to its provider's timeout_s: a target's longer one was
    accepted and cut there, as a timeout counted against the provider."""
    data = config({"slow": fake(timeout_s=1)})
    data["targets"] = {"patient": {"provider": "slow", "timeout_s": 5}}
    said = error(data)
    assert said.startswith("targets.patient.timeout_s: ") and "providers.slow.timeout_s" in said


@pytest.mark.parametrize(
    "table, key, value, said",
    [
        ("jobs", "stream", "LIFELINE_AUDIT", "audit.stream: its stream LIFELINE_AUDIT is also"),
        ("jobs", "stream", "KV_lifeline_results", "jobs.results_bucket: its stream"),
        ("audit", "stream", "KV_lifeline_health", "dispatcher.health_bucket: its stream"),
    ],
)
def test_two_of_lifelines_streams_of_one_name_are_refused(table, key, value, said):
    """Accepted, they mixed jobs, results, audit events or breakers in one stream, and
    `nats-config` gave clients the stream info of the results bucket (every job's key)."""
    data = config({"primary": fake()})
    data[table] = {key: value}
    assert said in error(data), error(data)


def test_a_config_without_providers_is_refused():
    assert error({"providers": {}, "routes": {}}).startswith("providers: ")


def test_an_empty_config_file_is_refused_and_mentions_providers(tmp_path):
    message = file_error(write(tmp_path, ""))
    assert message.startswith(f"{tmp_path / 'lifeline.toml'}: ") and "providers" in message


def test_an_out_of_range_fail_rate_names_the_file_the_provider_and_the_field(tmp_path):
    path = write(tmp_path, '[providers.primary]\nkind = "fake"\nfail_rate = 2\n')
    message = file_error(path)
    assert message.startswith(f"{path}: providers.primary")
    assert "fail_rate" in message


def test_a_fake_fail_status_that_is_not_an_http_error_is_refused():
    message = error(config({"primary": fake(fail_status=200)}))
    assert message.startswith("providers.primary") and "fail_status" in message


@pytest.mark.parametrize("table", [{"kind": "openai"}, {"kind": "openai", "model": ""}])
def test_an_openai_provider_needs_a_model(table):
    message = error(config({"primary": table}))
    assert message.startswith("providers.primary") and "model" in message


# ---- routes ---------------------------------------------------------------------------


def test_an_unknown_target_names_its_index_and_the_configured_providers():
    message = error(config({"primary": fake(), "backup": fake()}, route("primary", "nope")))
    assert message.startswith("routes.default.targets[1]: unknown target or provider 'nope'")
    assert "configured: backup, primary" in message


def test_an_unknown_error_kind_in_fallback_on_is_named_by_index():
    message = error(config({"p": fake()}, route("p", fallback_on=["rate_limit", "timout"])))
    assert message.startswith("routes.default.fallback_on[1]: unknown error kind 'timout'")
    assert "rate_limit" in message  # lists the known kinds


@pytest.mark.parametrize("status", [200, 302, 399, 600])
def test_a_status_outside_400_to_599_in_fallback_on_is_refused(status):
    message = error(config({"p": fake()}, route("p", fallback_on=[status])))
    assert message.startswith("routes.default.fallback_on[0]: ")
    assert str(status) in message and "400..599" in message


@pytest.mark.parametrize("name", ["a.b", "a b"])
def test_a_route_name_that_is_not_a_subject_token_is_refused(name):
    assert error(config({"p": fake()}, {name: {"targets": ["p"]}})).startswith(f"routes.{name}: ")


def test_a_route_without_targets_is_refused():
    assert "targets" in error(config({"p": fake()}, route()))


def test_a_misspelled_route_key_names_the_route():
    assert error(config({"p": fake()}, route("p", retries=2))).startswith(
        "routes.default.retries: unknown key"
    )


# ---- dispatcher and the file itself ---------------------------------------------------


def test_a_misspelled_dispatcher_key_is_named_first_as_an_unknown_key():
    assert error(config({"p": fake()}, max_request_byte=10)).startswith(
        "dispatcher.max_request_byte: unknown key"
    )


def test_a_default_timeout_above_the_maximum_is_refused():
    message = error(config({"p": fake()}, default_timeout_s=100, max_timeout_s=10))
    assert message.startswith("dispatcher: default_timeout_s (100) is above max_timeout_s (10)")


def test_an_unknown_top_level_table_is_refused_by_name():
    assert error({**config({"p": fake()}), "extra": {"a": 1}}).startswith("extra: unknown key")


def test_a_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.toml"
    assert file_error(path) == f"{path}: no such file"  # where a relative one was looked for:
    # tests/test_cli_newcomer.py


def test_invalid_toml_names_the_file(tmp_path):
    message = file_error(write(tmp_path, "[providers.p\nkind = "))
    assert message.startswith(f"{tmp_path / 'lifeline.toml'}: ") and "TOML" in message


def test_a_directory_passed_as_the_config_is_a_config_error(tmp_path):
    assert file_error(tmp_path).startswith(f"{tmp_path}: ")


# ---- templates, named targets and fallback chains -------------------------------------


def policy(routes: dict[str, Any], **tables: Any) -> dict[str, Any]:
    """A config with providers p and q, the routes given and any other tables (templates,
    targets, ...)."""
    return {**config({"p": fake(), "q": fake()}, routes), **tables}


def inline(**target: Any) -> dict[str, Any]:
    return {"r": {"targets": [{"provider": "p", **target}]}}


def test_an_unknown_template_in_an_inline_target_names_the_targets_key():
    message = error(policy(inline(template="terse")))
    assert message.startswith("routes.r.targets[0].template: unknown template 'terse'")


def test_a_misspelled_key_in_an_inline_target_is_an_unknown_key():
    message = error(policy(inline(tempreature=0.2)))
    assert message.startswith("routes.r.targets[0].tempreature: unknown key")


def test_a_target_timeout_above_the_dispatchers_maximum_is_refused():
    message = error(policy(inline(timeout_s=900)))
    assert message.startswith(
        "routes.r.targets[0].timeout_s: 900 is above dispatcher.max_timeout_s (600)"
    )


def test_a_target_timeout_under_a_millisecond_is_refused_saying_why():
    """Accepted, it made every call to the target time out (or be dropped as late)."""
    message = error(policy(inline(timeout_s=0.0002)))
    assert message.startswith("routes.r.targets[0].timeout_s: 0.0002 is under 1 ms: ")
    assert "whole milliseconds" in message


def test_an_unknown_kind_in_retry_on_is_named_by_index():
    message = error(policy(inline(retry_on=["timout"])))
    assert message.startswith("routes.r.targets[0].retry_on[0]: unknown error kind 'timout'")


def test_a_named_target_with_an_unknown_provider_names_its_provider_key():
    message = error(policy({"r": {"targets": ["x"]}}, targets={"x": {"provider": "nope"}}))
    assert message.startswith("targets.x.provider: unknown provider 'nope'")


def test_a_named_target_may_not_share_a_providers_name():
    message = error(policy({"r": {"targets": ["p"]}}, targets={"p": {"provider": "q"}}))
    assert message.startswith("targets.p: a provider has this name too")


@pytest.mark.parametrize(
    ("setting", "dropped"),
    [
        ({"temperature": 0.2}, "temperature"),
        ({"max_tokens": 256}, "max_tokens"),
        ({"top_p": 0.9}, "top_p"),
        ({"stop": ["END"]}, "stop"),
        ({"seed": 7}, "seed"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"parallel_tool_calls": False}, "tools"),  # dropping tools leaves it unsent too
    ],
    ids=lambda v: str(v),
)
def test_a_target_that_sets_a_parameter_and_drops_it_is_refused(setting, dropped):
    """Accepted, the drop won silently: the value the target set was never sent."""
    message = error(policy(inline(**setting, drop=[dropped])))
    (name,) = setting
    assert message.startswith(f"routes.r.targets[0].drop[0]: this target sets {name}")
    assert "keep one" in message


def test_a_named_target_that_sets_and_drops_temperature_names_its_table():
    targets = {"x": {"provider": "p", "temperature": 1.0, "drop": ["stop", "temperature"]}}
    message = error(policy({"r": {"targets": ["x"]}}, targets=targets))
    assert message.startswith("targets.x.drop[1]: this target sets temperature (1.0)")


def test_a_target_that_skips_requests_with_tools_and_drops_them_is_refused():
    """tools = false skips every request with tools, so its drop = ["tools"] never acted."""
    message = error(policy(inline(tools=False, drop=["tools"])))
    assert message.startswith("routes.r.targets[0].drop[0]: tools = false skips")


def test_a_name_a_target_cannot_drop_is_refused_naming_those_it_can():
    message = error(policy(inline(drop=["messages"])))
    assert message.startswith(
        "routes.r.targets[0].drop[0]: 'messages' is not a request parameter a target can drop "
        "(temperature, top_p, max_tokens, stop, seed, tools, tool_choice, parallel_tool_calls, "
        "response_format)"
    )


def test_a_user_template_without_input_is_refused():
    message = error(policy({"r": {"targets": ["p"]}}, templates={"t": {"user": "Answer briefly."}}))
    assert message.startswith("templates.t: `user` must contain {input}")


def test_a_template_with_neither_system_nor_user_is_refused():
    assert error(policy({"r": {"targets": ["p"]}}, templates={"t": {}})).startswith(
        "templates.t: a template needs"
    )


def test_a_route_max_attempts_above_the_dispatchers_is_refused():
    message = error(policy({"r": {"targets": ["p"], "max_attempts": 10}}))
    assert message.startswith("routes.r.max_attempts: 10 is above dispatcher.max_attempts (6)")


def test_an_unknown_target_in_a_context_length_chain_is_named_by_index():
    message = error(policy({"r": {"targets": ["p"], "context_length_fallbacks": ["big"]}}))
    assert message.startswith(
        "routes.r.context_length_fallbacks[0]: unknown target or provider 'big'"
    )


def test_an_unknown_key_in_fallbacks_is_refused():
    message = error(policy({"r": {"targets": ["p"]}}, fallbacks={"rate_limit": ["q"]}))
    assert message.startswith("fallbacks.rate_limit: unknown key")


def test_a_named_target_is_resolved_under_its_table_key():
    parsed = parse_config(
        policy({"r": {"targets": ["fast"]}}, targets={"fast": {"provider": "p", "model": "m-mini"}})
    )
    [spec] = parsed.routes["r"].targets
    assert (spec.name, spec.provider, spec.model) == ("fast", "p", "m-mini")


def test_an_inline_target_without_a_name_is_named_after_its_provider_and_model():
    parsed = parse_config(
        policy({"r": {"targets": [{"provider": "p", "model": "m-large"}, {"provider": "q"}]}})
    )
    assert [t.name for t in parsed.routes["r"].targets] == ["p:m-large", "q"]


def test_default_fallback_chains_apply_unless_a_route_turns_them_off():
    routes = {
        "plain": {"targets": ["p"]},
        "strict": {"targets": ["p"], "context_length_fallbacks": []},
    }
    parsed = parse_config(policy(routes, fallbacks={"context_length": ["q"]}))
    assert [t.name for t in parsed.routes["plain"].by_kind["context_length"]] == ["q"]
    assert "context_length" not in parsed.routes["strict"].by_kind


def test_a_load_balanced_group_resolves_each_member():
    parsed = parse_config(
        {
            "providers": {"a": {"kind": "fake"}, "b": {"kind": "fake"}, "c": {"kind": "fake"}},
            "routes": {
                "default": {"targets": [{"group": [{"provider": "a", "weight": 3}, "b"]}, "c"]}
            },
        }
    )
    group, last = parsed.routes["default"].targets
    assert [(t.name, t.weight) for t in group] == [("a", 3.0), ("b", 1.0)]
    assert last.name == "c"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"group": ["a", "nope"]},
            "routes.r.targets[0].group[1]: unknown target or provider 'nope'",
        ),
        ({"group": ["a"]}, "routes.r.targets[0].group: Expected `array` of length >= 2"),
        (
            {"group": ["a", {"provider": "a", "weight": 0}]},
            "routes.r.targets[0].group[1].weight: Expected `float` > 0.0",
        ),
        ({"group": ["a", "a"], "wieghts": [1, 2]}, "routes.r.targets[0].wieghts: unknown key"),
    ],
)
def test_a_bad_group_is_refused_naming_the_entry(entry, message):
    with pytest.raises(ConfigError) as exc:
        parse_config({"providers": {"a": {"kind": "fake"}}, "routes": {"r": {"targets": [entry]}}})
    assert str(exc.value).startswith(message), str(exc.value)


# ---- a provider's model allowlist -----------------------------------------------------


def listed(routes: dict[str, Any], **tables: Any) -> dict[str, Any]:
    """Provider p allows fake-1 (its model), m2 and m3; provider q allows any model."""
    return {**config({"p": fake(models=["m2", "m3"]), "q": fake()}, routes), **tables}


def test_targets_may_name_the_models_a_provider_allows():
    parsed = parse_config(
        listed(
            {"r": {"targets": [{"provider": "p", "model": "m3"}, {"provider": "q", "model": "x"}]}}
        )
    )
    assert [
        spec.model  # type: ignore[union-attr]
        for spec in parsed.routes["r"].targets
    ] == ["m3", "x"]
    assert parsed.providers["p"].models == ["m2", "m3"] and parsed.providers["q"].models == []


@pytest.mark.parametrize(
    ("routes", "tables", "key"),
    [
        ({"r": {"targets": [{"provider": "p", "model": "m9"}]}}, {}, "routes.r.targets[0].model"),
        (
            {"r": {"targets": ["q", {"group": ["q", {"provider": "p", "model": "m9"}]}]}},
            {},
            "routes.r.targets[1].group[1].model",
        ),
        (
            {"r": {"targets": ["x"]}},
            {"targets": {"x": {"provider": "p", "model": "m9"}}},
            "targets.x.model",
        ),
        (
            {"r": {"targets": ["q"]}},
            {"fallbacks": {"context_length": [{"provider": "p", "model": "m9"}]}},
            "fallbacks.context_length[0].model",
        ),
    ],
)
def test_a_model_outside_the_allowlist_is_refused_at_start_up_naming_both_keys(routes, tables, key):
    message = error(listed(routes, **tables))
    assert message.startswith(f"{key}: model 'm9' is not one provider p allows (fake-1, m2, m3)"), (
        message
    )
    assert "add it to providers.p.models" in message


def test_an_empty_model_in_an_allowlist_is_refused_by_index():
    message = error(config({"p": fake(models=["m2", " "])}))
    assert message.startswith("providers.p.models[1]: a model name cannot be empty")


# ---- an azure_openai provider: its deployment picks the model ---------------------------

AZURE = {"kind": "azure_openai", "endpoint": "https://r.openai.azure.com", "deployment": "dep-mini"}


def on_azure(routes: dict[str, Any], **tables: Any) -> dict[str, Any]:
    """Provider az calls deployment dep-mini (its model: dep-mini); q is a fake."""
    return {**config({"az": AZURE, "q": fake()}, routes), **tables}


def test_an_azure_target_naming_another_model_is_refused_by_check_config(tmp_path):
    """Every call goes to the deployment in the URL: the target would fall back to the same model
    under another name."""
    message = file_error(
        write(
            tmp_path,
            """
[providers.az]
kind = "azure_openai"
endpoint = "https://r.openai.azure.com"
deployment = "dep-gpt-4o-mini"
[routes.default]
targets = [{provider = "az", model = "gpt-4.1"}]
""",
        )
    )
    assert message == (
        f"{tmp_path / 'lifeline.toml'}: routes.default.targets[0].model: model 'gpt-4.1' cannot "
        "be chosen per target: provider az serves one model (every call goes to its deployment "
        "'dep-gpt-4o-mini', which picks the model); to call gpt-4.1, add a provider (kind = "
        '"azure_openai") that serves it and name that provider here instead (or drop `model`)'
    )


@pytest.mark.parametrize(
    ("routes", "tables", "key"),
    [
        (
            {"r": {"targets": ["q", {"group": ["q", {"provider": "az", "model": "gpt-4.1"}]}]}},
            {},
            "routes.r.targets[1].group[1].model",
        ),
        (
            {"r": {"targets": ["x"]}},
            {"targets": {"x": {"provider": "az", "model": "gpt-4.1"}}},
            "targets.x.model",
        ),
        (
            {"r": {"targets": ["q"]}},
            {"fallbacks": {"context_length": [{"provider": "az", "model": "gpt-4.1"}]}},
            "fallbacks.context_length[0].model",
        ),
    ],
)
def test_an_azure_target_naming_another_model_is_refused_wherever_it_is_written(
    routes, tables, key
):
    message = error(on_azure(routes, **tables))
    assert message.startswith(f"{key}: model 'gpt-4.1' cannot be chosen per target"), message
    assert "deployment 'dep-mini'" in message


def test_an_azure_target_may_name_its_providers_own_model_or_none():
    parsed = parse_config(
        config(
            {"az": {**AZURE, "model": "gpt-4o-mini"}},
            {"r": {"targets": ["az", {"provider": "az", "model": "gpt-4o-mini"}]}},
        )
    )
    models = [spec.model for spec in parsed.routes["r"].targets]  # type: ignore[union-attr]
    assert models == [None, "gpt-4o-mini"]


def test_models_on_an_azure_provider_is_refused_naming_the_key():
    message = error(config({"az": {**AZURE, "models": ["gpt-4.1"]}}))
    assert message.startswith(
        "providers.az.models: this provider serves one model (every call goes to its "
        "deployment 'dep-mini', which picks the model)"
    ), message
    assert "drop `models`" in message


def test_a_request_target_naming_another_model_on_azure_is_an_invalid_request():
    from schemas.wire import INVALID_REQUEST, encoder
    from service.routing import Rejected, Router

    router = Router(parse_config(on_azure({"default": {"targets": ["az"]}})))
    request = {**USER_HELLO, "targets": ["q", {"provider": "az", "model": "gpt-4.1"}]}
    with pytest.raises(Rejected) as refused:
        router.plan(encoder.encode(request))
    assert refused.value.error.type == INVALID_REQUEST
    assert refused.value.error.message.startswith(
        "targets[1].model: model 'gpt-4.1' cannot be chosen per target: provider az serves "
        "one model (every call goes to its deployment 'dep-mini'"
    ), refused.value.error.message
    [target] = router.plan(
        encoder.encode({**USER_HELLO, "targets": [{"provider": "az", "model": "dep-mini"}]})
    ).chain.targets
    assert target.model == "dep-mini"


def test_every_mistake_is_reported_at_once_with_the_closest_key_suggested():
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "dispatcher": {"max_in_flght": 10},
                "providers": {
                    "a": {"kind": "fake", "timeout_s": "slow"},
                    "b": {"kind": "fake", "latncy_ms": 5},
                },
                "jobs": {"ack_wait_s": 0},
                "routes": {"default": {"targets": ["a"]}},
            }
        )
    lines = str(caught.value).splitlines()
    assert lines[0] == "4 mistakes:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "dispatcher.max_in_flght: unknown key (did you mean 'max_in_flight'?)",
        "jobs.ack_wait_s: Expected `float` >= 1.0",
        "providers.a.timeout_s: Expected `float`, got `str`",
        "providers.b.latncy_ms: unknown key (did you mean 'latency_ms'?)",
    ]


def test_a_job_s_ack_wait_stays_inside_the_audit_stream_s_dedup_window():
    """A job delivered again after its result was stored publishes its audit event once more;
    the audit stream drops that as a duplicate only within its 600 s window, so a redelivery
    must come sooner."""
    from service.audit import DEDUP_WINDOW_S

    base = {"providers": {"a": {"kind": "fake"}}, "routes": {"default": {"targets": ["a"]}}}
    assert parse_config({**base, "jobs": {"ack_wait_s": 300}}).jobs.ack_wait_s * 2 <= (
        DEDUP_WINDOW_S
    )
    with pytest.raises(ConfigError, match=r"jobs\.ack_wait_s: Expected `float` <= 300"):
        parse_config({**base, "jobs": {"ack_wait_s": 900}})


def test_a_key_like_none_known_gets_no_guess():
    with pytest.raises(ConfigError, match=r"dispatcher\.zzz: unknown key \(check its spelling\)"):
        parse_config({"dispatcher": {"zzz": 1}, "providers": {"a": {"kind": "fake"}}})


@pytest.mark.parametrize(
    "chain",
    [
        [{"provider": "p", "model": f"m{i}"} for i in range(257)],
        [
            {"group": [{"provider": "p", "model": f"m{i}"} for i in range(200)]},
            *[{"provider": "p", "model": f"m{i}"} for i in range(200, 257)],
        ],
    ],
    ids=["targets", "group members"],
)
def test_a_chain_of_more_than_256_targets_is_refused_saying_why(chain):
    """Each target a failed request leaves is an attempt in its reply and its audit event: a
    route of 8,200 targets answered every request reply_too_large, its attempts lost."""
    models = [f"m{i}" for i in range(257)]
    with pytest.raises(ConfigError, match=r"routes\.r\.targets: 257 targets, over the 256"):
        parse_config({"providers": {"p": fake(models=models)}, "routes": {"r": {"targets": chain}}})
    parse_config({"providers": {"p": fake(models=models)}, "routes": {"r": {"targets": chain[1:]}}})


@pytest.mark.parametrize(
    ("url", "wanted"),
    [
        ("http://localhost:4222", "http:// is not a NATS scheme"),
        ("nats://localhost:99999", "Port out of range"),
        ("nats://a:b:c", "is not a URL"),
        ("nats://[::1", "is not a URL"),
        ("not a url", "names no host"),
        ("nats://h1:4222,ws://h2:80", "cannot be mixed"),
    ],
)
def test_a_nats_url_nats_py_cannot_dial_is_refused_by_check_config(tmp_path, url, wanted):
    """check-config said OK to these, and every command then failed to connect ("cannot
    reach NATS ... invalid connect url option"), or looked up 'not a url' as a host name."""
    path = tmp_path / "lifeline.toml"
    path.write_text(f'[providers.p]\nkind = "fake"\n[nats]\nurl = "{url}"\n')
    message = file_error(path)
    assert message.startswith(f"{path}: nats.url: ") and wanted in message, message


def test_a_nats_url_the_client_takes_passes():
    for url in ("localhost", "127.0.0.1:4222", "[::1]:4222", "tls://a:4222, nats://b", "wss://h"):
        assert parse_config({**config({"p": fake()}), "nats": {"url": url}}).nats.url == url


def test_a_utf8_config_reads_the_same_under_any_locale(tmp_path):
    """It was read in the locale's encoding: under an ASCII one check-config refused a template
    with an accent ("cannot read it: 'ascii' codec ..."), a latin-1 one garbled it."""
    path = tmp_path / "lifeline.toml"
    path.write_text(
        '[providers.p]\nkind = "fake"\n[templates.fr]\nsystem = "Réponds. {system}"\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=cli_env(LC_ALL="C", PYTHONUTF8="0"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert load_config(path).templates["fr"].system == "Réponds. {system}"


def test_a_config_saved_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "lifeline.toml"
    path.write_bytes(b'\xef\xbb\xbf[providers.p]\nkind = "fake"\n')
    assert list(load_config(path).providers) == ["p"]


def test_a_config_not_utf8_or_empty_says_what_to_do(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    text = b'[providers.p]\nkind = "fake"\nmodel = "caf\xe9"\n'
    latin1.write_bytes(text)
    assert file_error(latin1) == (
        f"{latin1}: not UTF-8 (byte {text.index(0xE9)}); a TOML file is UTF-8: save it as that"
    )
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert file_error(empty) == (
        f"{empty}: providers: at least one [providers.<name>] table is needed"
    )


def test_a_mistake_is_one_line_whatever_its_key_holds(tmp_path):
    """A quoted key's line break split its mistake over two lines, and a terminal escape in
    it reached the operator's terminal as one."""
    path = tmp_path / "lifeline.toml"
    path.write_text(
        '[providers."a\\nb"]\nkind = "fake"\n[providers."c\\u001b[31m"]\nkind = "fake"\n'
        "[dispatcher]\nmax_in_flght = 1\n"
    )
    assert file_error(path).splitlines() == [
        f"{path}: 3 mistakes:",
        "  providers.a\\nb: provider names are 1 to 256 letters, digits, '_' and '-'",
        "  providers.c\\x1b[31m: provider names are 1 to 256 letters, digits, '_' and '-'",
        "  dispatcher.max_in_flght: unknown key (did you mean 'max_in_flight'?)",
    ]
    path.write_text('[providers.p]\nkind = "fake"\n[targets."t\\nu"]\nprovider = "p"\n')
    assert file_error(path) == (
        f"{path}: targets.t\\nu: target names are 1 to 256 letters, digits, '_' and '-'"
    )


def test_a_bad_fallbacks_chain_does_not_hide_the_routes_mistakes():
    """The README promises the first mistake of each route; a bad [fallbacks] chain was the
    only one shown, and fixing it revealed the routes' next."""
    data = config({"p": fake()}, routes={"a": {"targets": ["y"]}})
    data["fallbacks"] = {"context_length": ["x"]}
    assert error(data).splitlines() == [
        "2 mistakes:",
        "  fallbacks.context_length[0]: unknown target or provider 'x' (configured: p)",
        "  routes.a.targets[0]: unknown target or provider 'y' (configured: p)",
    ]


def test_a_value_outside_a_fixed_set_is_refused_with_the_set():
    """msgspec's "Invalid enum value 'p99'" did not say what the key takes."""
    route = {"targets": ["p"], "hedge": "p99"}
    assert error(config({"p": fake()}, routes={"r": route})) == (
        "routes.r.hedge: Invalid enum value 'p99' (expected one of 'p95')"
    )
    openai = {"kind": "openai", "model": "m", "max_tokens_field": "tokens"}
    assert error(config({"o": openai})) == (
        "providers.o.max_tokens_field: Invalid enum value 'tokens' (expected one of "
        "'max_tokens', 'max_completion_tokens')"
    )


def test_an_empty_password_file_is_refused_by_check_config(tmp_path):
    """It was taken as the password "", and every command then failed NATS authentication."""
    secret = tmp_path / "nats_password"
    secret.write_text("\n")
    path = tmp_path / "lifeline.toml"
    path.write_text(
        f'[providers.p]\nkind = "fake"\n[nats]\nuser = "u"\npassword_file = "{secret}"\n'
    )
    done = subprocess.run(
        [*LIFELINE, "check-config", "--config", str(path)],
        env=cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stdout
    assert done.stderr == (
        f"lifeline: NATS {path} [nats] password_file: the password file {secret} is empty\n"
    )


# ---- model aliases --------------------------------------------------------------------------


def test_model_aliases_name_routes_targets_or_providers_and_say_what_is_wrong(tmp_path):
    base = config({"main": fake(), "backup": fake()}) | {"targets": {"small": {"provider": "main"}}}
    aliases = {"gpt-4o-mini": "default", "gpt-4.1": "small", "llama/3.1 70b": "backup"}
    assert parse_config(base | {"model_aliases": aliases}).model_aliases == aliases
    assert error(base | {"model_aliases": {"gpt-4o": "nope"}}) == (
        "model_aliases.gpt-4o: 'nope' is no route, target or provider of this config "
        "(default, small, main, backup)"
    )
    assert "'backup' names a route, target or provider already" in error(
        base | {"model_aliases": {"backup": "default"}}
    )
    assert "an alias is 1 to 256 printable characters" in error(
        base | {"model_aliases": {"bell\a": "default"}}
    )
    assert "model_aliases.x: 3 is no route" in error(base | {"model_aliases": {"x": 3}})
    # An alias of a route refused for its own mistake adds none of its own.
    broken = base | {
        "routes": {"default": {"targets": ["nope"]}},
        "model_aliases": {"m": "default"},
    }
    assert error(broken) == "routes.default.targets[0]: unknown target or provider 'nope' " + (
        "(configured: backup, main, small)"
    )
    # TOML reads an unquoted dotted key as a table: the mistake says to quote it.
    written = write(tmp_path, '[providers.a]\nkind = "fake"\n[model_aliases]\ngpt-4.1 = "a"\n')
    assert file_error(written).endswith(
        'model_aliases.gpt-4: a table; quote an alias with a dot in it: "gpt-4.1" = ...'
    )
