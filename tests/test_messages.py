from __future__ import annotations

import attrs
import pytest

from messages import (
    AgentKey,
    AgentOutput,
    CompletionResult,
    Completion,
    Decision,
    Disconnected,
    RateLimited,
    StageKey,
    TokenUsage,
    is_retryable,
    BadRequest,
)

KEY = AgentKey(run_id="r", branch_id="b", stage="plan", agent="gemini")


def test_messages_are_frozen_slotted_keyword_only() -> None:
    usage = TokenUsage.of(input_tokens=10, output_tokens=5)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        usage.input_tokens = 3  # type: ignore[misc]
    assert not hasattr(usage, "__dict__")
    with pytest.raises(TypeError):
        StageKey("r", "b", "plan")  # type: ignore[misc]


def test_identity_is_validated_and_hashable() -> None:
    with pytest.raises(ValueError, match="stage"):
        StageKey(run_id="r", branch_id="b", stage="")
    assert KEY.stage_key == StageKey(run_id="r", branch_id="b", stage="plan")
    assert KEY.stage_key.agent("gemini") == KEY
    assert len({KEY, AgentKey(run_id="r", branch_id="b", stage="plan", agent="gemini")}) == 1


@pytest.mark.parametrize("cls", [StageKey, AgentKey])
@pytest.mark.parametrize("bad", ["", None, 5, b"r"])
def test_every_part_of_a_key_is_checked_and_named(cls: type, bad: object) -> None:
    parts = {f.name: "x" for f in attrs.fields(cls)}
    for name in parts:
        with pytest.raises(ValueError, match=f"^{name} must be a non-empty string, got {bad!r}$".replace("'", ".")):
            cls(**{**parts, name: bad})


def test_a_key_names_its_first_wrong_part_and_takes_str_subclasses() -> None:
    class Name(str):
        pass

    with pytest.raises(ValueError, match="^branch_id must"):
        AgentKey(run_id="r", branch_id="", stage="", agent="a")
    key = AgentKey(run_id=Name("r"), branch_id="b", stage="plan", agent="gemini")
    assert key == KEY and hash(key) == hash(KEY)


def test_token_usage_sums_and_validates() -> None:
    a = TokenUsage.of(input_tokens=1000, cached_input_tokens=300, output_tokens=500, reasoning_output_tokens=100)
    b = TokenUsage.of(input_tokens=1, output_tokens=2)
    total = a + b
    assert total.as_dict() == {
        "input_tokens": 1001,
        "cached_input_tokens": 300,
        "output_tokens": 502,
        "reasoning_output_tokens": 100,
        "total_tokens": 1503,
        "cache_write_input_tokens": 0,
        "cache_write_1h_input_tokens": 0,
    }
    writes = TokenUsage.of(input_tokens=10, cache_write_input_tokens=4, cache_write_1h_input_tokens=1)
    assert (writes + writes).cache_write_input_tokens == 8
    assert (writes + writes).cache_write_1h_input_tokens == 2
    # The digest leaves zero cache writes out: digests taken before they were counted stay valid.
    assert "cache_write_input_tokens" not in total.digest_dict()
    assert writes.digest_dict()["cache_write_1h_input_tokens"] == 1
    assert a.non_cached_input_tokens == 700
    with pytest.raises(ValueError, match="output_tokens"):
        TokenUsage(output_tokens=-1)


def test_completion_result_has_exactly_one_outcome() -> None:
    with pytest.raises(ValueError):
        CompletionResult(key=KEY, attempt=1)
    with pytest.raises(ValueError):
        CompletionResult(
            key=KEY,
            attempt=1,
            completion=Completion(content="{}", usage=None, model="m"),
            error=Disconnected("x"),
        )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # An interceptor answering for the gateway with usage="lots" crashed
        # the shared store writer; 10**15 tokens were billed as ~$20 billion.
        ({"usage": "lots"}, "usage must be a TokenUsage or None, got str"),
        ({"usage": TokenUsage(input_tokens=10**15)}, "more than one call can use"),
        ({"error": "quota gone"}, "error must be a ProviderError or None, got str"),
        ({"error": Disconnected("x"), "attempt": 0}, "attempt must be an int >= 1, got 0"),
        ({"error": Disconnected("x"), "attempt": True}, "attempt must be an int >= 1, got True"),
        ({"error": Disconnected("x"), "key": "k"}, "key must be an AgentKey, got 'k'"),
        ({"error": Disconnected("x"), "model": 5}, "model must be a string or None, got int"),
        ({"completion": {"content": "{}"}, "error": None}, "completion must be a Completion or None, got dict"),
    ],
)
def test_a_completion_result_is_checked_when_built(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"key": KEY, "attempt": 1, "error": Disconnected("cut"), **fields}
    with pytest.raises(ValueError, match=message):
        CompletionResult(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # The coordinator failed on output="<str>" with an AttributeError.
        ({"output": '{"stage": "plan"}'}, "output must be an AgentOutput or None, got str"),
        ({"attempts": -1}, "attempts must be an int >= 0, got -1"),
        ({"error": ValueError("x")}, "error must be a string or None, got ValueError"),
        ({"key": KEY.stage_key}, "key must be an AgentKey"),
    ],
)
def test_an_agent_reply_is_checked_when_built(fields: dict[str, object], message: str) -> None:
    from messages import AgentReply

    values: dict[str, object] = {"key": KEY, "attempts": 1, "output": None, "error": "gave up", **fields}
    with pytest.raises(ValueError, match=message):
        AgentReply(**values)  # type: ignore[arg-type]
    assert AgentReply(key=KEY, attempts=0, output=None, error="seat vacated").attempts == 0


def test_attempt_and_seq_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempt"):
        AgentOutput(key=KEY, attempt=0, status="accepted", content="", format="text", usage=None, model="m", provider="sim")
    with pytest.raises(ValueError, match="seq"):
        Decision(key=KEY.stage_key, seq=0, status="ok", verdict={})


def test_error_classes() -> None:
    assert is_retryable(Disconnected("gone"))
    assert not is_retryable(BadRequest("nope"))
    assert not is_retryable(ValueError("not ours"))
    assert RateLimited("slow down", retry_after=-5).retry_after == 0.0
    assert Disconnected("a") == Disconnected("a") != Disconnected("b")


def test_an_attempts_event_takes_its_identity_from_the_key() -> None:
    from messages import AgentKey, PersistEvent

    key = AgentKey(run_id="r", branch_id="b", stage="plan", agent="claude")
    event = PersistEvent.of_attempt(key, 3, "retry", {"delay_s": 1.5})
    assert (event.run_id, event.branch_id, event.stage, event.agent, event.attempt, event.kind) == (
        "r", "b", "plan", "claude", 3, "retry"
    )
    assert dict(event.detail) == {"delay_s": 1.5} and event.reply_to is None


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Decision(key=KEY.stage_key, seq=1, status="bogus", verdict={}), "'status' must be in"),  # type: ignore[arg-type]
        (lambda: AgentOutput(key=KEY, attempt=1, status="bogus", content="", format="text", usage=None, model="m", provider="p"), "'status' must be in"),  # type: ignore[arg-type]
        (lambda: AgentOutput(key=KEY, attempt=1, status="failed", content="", format="xml", usage=None, model="m", provider="p"), "'format' must be in"),  # type: ignore[arg-type]
        (lambda: Decision(key=KEY.stage_key, seq=True, status="ok", verdict={}), "seq must be an int >= 1, got True"),
    ],
)
def test_message_enums_and_counts_are_checked_when_built(build: object, message: str) -> None:
    # Each was accepted, and a wrong status went into the store as written.
    with pytest.raises(ValueError, match=message):
        build()  # type: ignore[operator]


def test_a_completion_request_needs_an_agent_key() -> None:
    from messages import CompletionRequest

    with pytest.raises(TypeError, match="'key' must be"):
        CompletionRequest(key="k", attempt=1, spec_id="s", provider="p", model="m", prompt="x")  # type: ignore[arg-type]
