"""Prices: the vendored LiteLLM table, matching, exact arithmetic,
overrides, and a run on three priced models plus an unknown one."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import attrs
import pytest

from actors import (
    MockProvider,
    PriceFileError,
    PriceTable,
    SimulatedProvider,
    open_orchestrator,
    pipeline_from_dict,
)
from actors._pricing import vendored_meta
from messages import Completion, CompletionRequest, TokenUsage
from store import Store

VENDORED = json.loads(
    (Path(__file__).resolve().parent.parent / "actors" / "_model_prices.json").read_text()
)


def usage(inp: int, out: int, cached: int = 0, reasoning: int = 0) -> TokenUsage:
    return TokenUsage.of(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, reasoning_output_tokens=reasoning
    )


def test_the_vendored_table_says_where_it_comes_from() -> None:
    meta = vendored_meta()
    assert meta["litellm_version"] == "1.110.2"
    assert "litellm" in meta["source"] and meta["units"] == "USD per single token"
    table = PriceTable.vendored()
    assert len(table) == len(VENDORED) - 1  # every entry but _meta
    assert "1.110.2" in table.source and len(table.version) == 12


@pytest.mark.parametrize(
    ("model", "provider", "entry"),
    [
        ("gpt-4o", None, "gpt-4o"),
        ("GPT-4o", None, "gpt-4o"),
        ("openai/gpt-4o", None, "gpt-4o"),
        ("gpt-4o-mini", None, "gpt-4o-mini"),  # longest match, not gpt-4o
        ("gpt-4o-2024-05-13-my-finetune", None, "gpt-4o-2024-05-13"),
        ("claude-sonnet-4.5", None, "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", None, "claude-sonnet-4-5"),
        ("gemini-2.5-flash", "gemini", "gemini/gemini-2.5-flash"),
        ("gemini-2.5-pro", None, "gemini-2.5-pro"),
    ],
)
def test_lookup_by_name_alias_and_prefix(model: str, provider: str | None, entry: str) -> None:
    price = PriceTable.vendored().lookup(model, provider)
    assert price is not None and price.name == entry


@pytest.mark.parametrize(
    "model",
    # o1-mini was priced as o1 (13x its price): a prefix that names a size
    # or variant is another model, however long the table's name.
    # A variant of the longest name is not the next shorter one either
    # (gpt-4-0613-mini was never gpt-4).
    [
        "sim-model",
        "acme-llm-9",
        "gpt-5.9",
        "gpt",
        "",
        "o1-mini",
        "o1-mini-2024-09-12",
        "gpt-4o-realtime-x",
        "gpt-4-0613-mini",
    ],
)
def test_unknown_models_are_unpriced_not_guessed(model: str) -> None:
    table = PriceTable.vendored()
    assert table.lookup(model) is None
    assert table.cost(usage(1_000, 1_000), model) is None


def test_cached_input_and_reasoning_are_priced_as_the_table_says() -> None:
    table = PriceTable.vendored()
    e = VENDORED["gemini/gemini-2.5-flash"]
    got = table.cost(usage(10_000, 3_000, cached=4_000, reasoning=1_000), "gemini-2.5-flash", "gemini")
    expected = (
        6_000 * Decimal(str(e["input_cost_per_token"]))
        + 4_000 * Decimal(str(e["cache_read_input_token_cost"]))
        + 2_000 * Decimal(str(e["output_cost_per_token"]))
        + 1_000 * Decimal(str(e["output_cost_per_reasoning_token"]))
    )
    assert got == expected == Decimal("0.0018") + Decimal("0.00012") + Decimal("0.005") + Decimal("0.0025")


def test_a_part_claimed_larger_than_its_whole_is_priced_as_the_whole() -> None:
    """A provider's usage may claim more cached (or written) input than
    input, or more reasoning than output: each part is capped at its whole,
    so a cost is never negative nor more than the whole at the part's rate."""
    table = PriceTable(
        {
            "m": {
                "input_cost_per_token": 1,
                "output_cost_per_token": 10,
                "cache_read_input_token_cost": 100,
                "cache_creation_input_token_cost": 1_000,
                "cache_creation_input_token_cost_above_1hr": 10_000,
                "output_cost_per_reasoning_token": 100_000,
            }
        }
    )

    def cost(**fields: int) -> Decimal | None:
        return table.cost(TokenUsage(**fields), "m")

    assert cost(output_tokens=10, reasoning_output_tokens=50) == cost(output_tokens=10, reasoning_output_tokens=10)
    assert cost(input_tokens=10, cached_input_tokens=50) == cost(input_tokens=10, cached_input_tokens=10) == 1_000
    assert cost(input_tokens=10, cached_input_tokens=4, cache_write_input_tokens=50) == 4 * 100 + 6 * 1_000
    both = cost(input_tokens=10, cache_write_input_tokens=3, cache_write_1h_input_tokens=50)
    assert both == 7 * 1 + 3 * 10_000


def test_a_long_prompt_is_priced_at_the_tier_above_200k() -> None:
    table = PriceTable.vendored()
    e = VENDORED["gemini-2.5-pro"]
    small = table.cost(usage(200_000, 1_000), "gemini-2.5-pro")
    large = table.cost(usage(200_001, 1_000), "gemini-2.5-pro")
    assert small == 200_000 * Decimal(str(e["input_cost_per_token"])) + 1_000 * Decimal(str(e["output_cost_per_token"]))
    assert large == 200_001 * Decimal(str(e["input_cost_per_token_above_200k_tokens"])) + 1_000 * Decimal(
        str(e["output_cost_per_token_above_200k_tokens"])
    )


def test_a_tier_derives_missing_rates_from_its_own_input_and_output(tmp_path: Path) -> None:
    """Above 200k, reasoning tokens were charged at the *base* output rate
    and cache reads at the *base* input rate when neither had a rate of its
    own: a long prompt's reasoning and cached tokens cost less than plain
    ones."""
    path = tmp_path / "tiers.json"
    path.write_text(json.dumps({"tiered-9": {
        "input_cost_per_token": 1e-06, "output_cost_per_token": 4e-06,
        "input_cost_per_token_above_200k_tokens": 2e-06, "output_cost_per_token_above_200k_tokens": 8e-06,
    }}))
    table = PriceTable.load(str(path))
    plain = table.cost(usage(250_000, 1_000), "tiered-9")
    assert plain == Decimal("0.5") + Decimal("0.008")
    assert table.cost(usage(250_000, 1_000, reasoning=500), "tiered-9") == plain
    assert table.cost(usage(250_000, 1_000, cached=50_000), "tiered-9") == plain
    # Given rates still apply, the tier's own or else the base's.
    path.write_text(json.dumps({"tiered-9": {
        "input_cost_per_token": 1e-06, "output_cost_per_token": 4e-06, "cache_read_input_token_cost": 1e-07,
        "output_cost_per_reasoning_token": 3e-06,
        "input_cost_per_token_above_200k_tokens": 2e-06, "output_cost_per_token_above_200k_tokens": 8e-06,
    }}))
    table = PriceTable.load(str(path))
    assert table.cost(usage(250_000, 1_000, cached=50_000, reasoning=500), "tiered-9") == (
        200_000 * Decimal("2e-06") + 50_000 * Decimal("1e-07") + 500 * Decimal("8e-06") + 500 * Decimal("3e-06")
    )


def test_an_override_names_a_model_in_any_case(tmp_path: Path) -> None:
    """'GPT-5' with one rate was refused as a new model needing both, while
    'gpt-5' was merged; lookups ignore case, so validation does too."""
    path = tmp_path / "upper.json"
    path.write_text(json.dumps({"GPT-5": {"input_cost_per_token": 1e-03}}))
    table = PriceTable.load(str(path))
    assert table.cost(usage(1_000, 0), "gpt-5") == Decimal("1")


def test_costs_are_exact() -> None:
    table = PriceTable.vendored()
    one = table.cost(usage(1, 0), "gpt-4o")
    assert one == Decimal("0.0000025")
    assert sum((one for _ in range(1_000_000)), Decimal(0)) == Decimal("2.5")  # no float drift


def test_an_override_file_replaces_and_adds_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o": {"input_cost_per_token": 1e-06},
                "acme-llm-9": {"input_cost_per_token": 2e-06, "output_cost_per_token": 4e-06},
            }
        )
    )
    base = PriceTable.vendored()
    table = PriceTable.load(str(path))
    assert table.cost(usage(1_000, 1_000), "gpt-4o") == Decimal("0.001") + Decimal("0.01")
    assert table.cost(usage(1_000, 1_000), "acme-llm-9-preview") == Decimal("0.006")
    assert table.version != base.version and str(path) in table.source
    assert base.cost(usage(1_000, 0), "gpt-4o") == Decimal("0.0025"), "the vendored table is untouched"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"m": 3}', "entry 'm' must be an object"),
        ('{"m": {"input_cost_per_token": -1, "output_cost_per_token": 0}}', "non-negative"),
        ('{"m": {"input_cost_per_token": true, "output_cost_per_token": 0}}', "non-negative"),
        ('{"new-model": {"input_cost_per_token": 1e-06}}', "needs output_cost_per_token"),
        ('{"m": {"input_cost_per_token": 1e400, "output_cost_per_token": 0}}', "at most 1000 USD per token"),
        # The last of two silently won; a RecursionError and /dev/zero's
        # MemoryError ended the command without naming the file.
        ('{"m": {"input_cost_per_token": 1, "output_cost_per_token": 0}, "M": {"input_cost_per_token": 2}}',
         "'M' is given twice \\(as 'm'\\)"),
        ('{"m": {"input_cost_per_token": 1, "input_cost_per_token": 2, "output_cost_per_token": 0}}',
         "'input_cost_per_token' is given twice"),
        ('{"m": ' * 100_000, "nested too deeply"),
        (" " * (16 * 2**20 + 1), "at most 16 MiB"),
    ],
)
def test_a_bad_override_file_is_refused_naming_it(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(PriceFileError, match=message) as info:
        PriceTable.load(str(path))
    assert str(path) in str(info.value)


def test_a_missing_override_file_is_refused() -> None:
    with pytest.raises(PriceFileError, match="cannot read"):
        PriceTable.load("/nonexistent/prices.json")


# -- acceptance 2: three priced models and an unknown one ----------------------

MODELS = {
    "gemini": "gemini-2.5-pro",
    "claude": "claude-sonnet-4-5",
    "gpt_pro": "gpt-4o",
    "mystery": "acme-llm-9",
}
CALL = usage(10_000, 2_000, cached=4_000, reasoning=500)


def priced_pipeline() -> object:
    return pipeline_from_dict(
        {
            "agents": {name: {"provider": "sim", "model": model} for name, model in MODELS.items()},
            "stages": [
                {"name": "plan", "agents": list(MODELS), "mode": "parallel"},
                {"name": "tasks", "agents": list(MODELS), "mode": "sequential"},
            ],
        },
        source="test",
    )


def fixed_usage_provider() -> MockProvider:
    sim = SimulatedProvider(seed=1, disagreement_rate=0.0)

    def answer(request: CompletionRequest) -> Completion:
        return attrs.evolve(sim.answer(request), usage=CALL)

    return MockProvider(answer, name="sim")


async def test_a_run_on_three_priced_models_costs_what_the_table_says(db_path: str) -> None:
    # Hand computation, per call (10,000 in of which 4,000 cached; 2,000 out
    # of which 500 reasoning), from the vendored table's per-token prices:
    #   gemini-2.5-pro    6,000 x 1.25e-6 + 4,000 x 1.25e-7 + 2,000 x 1e-5   = 0.0280
    #   claude-sonnet-4-5 6,000 x 3e-6    + 4,000 x 3e-7    + 2,000 x 1.5e-5 = 0.0492
    #   gpt-4o            6,000 x 2.5e-6  + 4,000 x 1.25e-6 + 2,000 x 1e-5   = 0.0400
    # (none of them has a separate reasoning price, so reasoning is output).
    per_call = {"gemini-2.5-pro": Decimal("0.028"), "claude-sonnet-4-5": Decimal("0.0492"), "gpt-4o": Decimal("0.04")}
    for model, cost in per_call.items():
        e = VENDORED[model]
        assert "output_cost_per_reasoning_token" not in e
        assert (
            6_000 * Decimal(str(e["input_cost_per_token"]))
            + 4_000 * Decimal(str(e["cache_read_input_token_cost"]))
            + 2_000 * Decimal(str(e["output_cost_per_token"]))
        ) == cost, f"the vendored price of {model} changed"

    async with open_orchestrator(store=db_path, provider=fixed_usage_provider(), pipeline=priced_pipeline()) as orch:  # type: ignore[arg-type]
        result = await orch.run("SPEC-COST")
    assert result.completed, result.halt_message
    assert result.cost_usd == 2 * sum(per_call.values()) == Decimal("0.2344")
    assert result.unpriced_calls == 2
    with Store.open(db_path, readonly=True) as s:
        events = [e for e in s.events(result.run_id) if e.kind == "metrics"]
    assert len(events) == 1
    totals_event = events[0].detail
    by_model = totals_event["by"]["model"]
    for model, cost in per_call.items():
        assert Decimal(by_model[model]["cost_usd_exact"]) == 2 * cost
        assert by_model[model]["turns"] == 2 and by_model[model]["unpriced_calls"] == 0
    assert by_model["acme-llm-9"]["unpriced_calls"] == 2
    assert Decimal(by_model["acme-llm-9"]["cost_usd_exact"]) == 0
    assert totals_event["unpriced_models"] == ["acme-llm-9"]
    assert Decimal(totals_event["cost_usd_exact"]) == Decimal("0.2344")
    by_agent = totals_event["by"]["agent"]
    assert Decimal(by_agent["claude"]["cost_usd_exact"]) == Decimal("0.0984")
    by_stage = totals_event["by"]["stage"]
    assert Decimal(by_stage["plan"]["cost_usd_exact"]) == Decimal(by_stage["tasks"]["cost_usd_exact"]) == Decimal("0.1172")


def test_float_rates_from_python_are_taken_exactly() -> None:
    # "must be a non-negative number, got 3e-06" refused every float.
    table = PriceTable.vendored().with_overrides(
        {"m": {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05}}
    )
    price = table.lookup("m")
    assert price is not None
    assert (price.rates.input, price.rates.output) == (Decimal("0.000003"), Decimal("0.000015"))
    with pytest.raises(PriceFileError, match="non-negative"):
        PriceTable.vendored().with_overrides({"m": {"input_cost_per_token": math.nan, "output_cost_per_token": 0}})


def test_a_bad_rate_is_named_as_the_file_writes_it(tmp_path: Path) -> None:
    # "got Decimal('-0.000001')": Python's spelling of the file's -1e-6.
    path = tmp_path / "prices.json"
    cases = (("-0.000001", "got -0.000001"), ("-0.00000030", "got -0.00000030"), ('"cheap"', 'got "cheap"'),
             ("null", "got null"))
    for written, shown in cases:
        path.write_text('{"m": {"input_cost_per_token": %s, "output_cost_per_token": 0}}' % written)
        with pytest.raises(PriceFileError) as caught:
            PriceTable.load(str(path))
        message = str(caught.value)
        assert message.endswith(shown) and "Decimal" not in message, message


def test_an_override_that_is_not_a_path_or_a_number_is_named() -> None:
    # load(3) read file descriptor 3 and closed it (load(0): stdin); a
    # Decimal NaN rate failed as a bare InvalidOperation.
    with pytest.raises(PriceFileError, match="must be a file path, got 3"):
        PriceTable.load(3)  # type: ignore[arg-type]
    with pytest.raises(PriceFileError, match="non-negative number"):
        PriceTable.vendored().with_overrides({"m": {"input_cost_per_token": Decimal("NaN"), "output_cost_per_token": 0}})
