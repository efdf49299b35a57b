"""Pipelines: which stages, which agents, how they run and how they agree.

The default is the reference's plan -> tasks -> implement -> validate ->
audit -> unlock.  A pipeline can also come from TOML (see README).  All
validation happens here, before anything runs or is written.
"""

from __future__ import annotations

import json
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from messages import ConclaveError

Mode = Literal["sequential", "parallel"]

# Per known stage: the stage-specific required fields (``stage`` and ``agent``
# are always required) and the field the coordinator compares across agents.
_KNOWN_STAGES: dict[str, tuple[str, ...]] = {
    "plan": ("work_breakdown", "acceptance_mapping"),
    "tasks": ("tasks",),
    "implement": ("implementation",),
    "validate": ("test_strategy",),
    "audit": ("audit_verdict",),
    "unlock": ("unlock_decision",),
    "clarify": ("issues",),
    "analyze": ("issues",),
    "checklist": ("requirements",),
}
# The reference's roster and mode of each known stage (speckit-facts 1.1,
# 1.2): a stage a file names without agents or mode gets these.  (Every
# stage got gemini, claude and gpt_pro, sequential: a file that wrote the
# default pipeline out by name ran another one - implement without
# gpt_codex, validate, audit and unlock one agent after another.)
_KNOWN_PANELS: dict[str, tuple[str, ...]] = {
    "implement": ("gemini", "claude", "gpt_codex", "gpt_pro"),
    "clarify": ("gemini", "claude", "code"),
    "analyze": ("gemini", "claude", "code"),
    "checklist": ("claude", "code"),
}
_PARALLEL_STAGES = frozenset({"validate", "audit", "unlock"})
_STAGE_ALIASES = {"review": "audit", "spec-review": "audit"}
ALWAYS_REQUIRED = ("stage", "agent")

# Canonical agents and their default models (the reference's prompt metadata).
KNOWN_AGENTS: dict[str, str] = {
    "gemini": "gemini-2.5-pro",
    "claude": "claude-sonnet-4-5",
    "code": "claude-sonnet-4-5",
    "gpt_codex": "gpt-5-codex",
    "gpt_pro": "gpt-5",
}


class PipelineError(ConclaveError, ValueError):
    """The pipeline definition is invalid; the message names what and where."""


def canonical_stage(name: str) -> str | None:
    """``Plan``, ``spec-plan`` and ``plan`` are all ``plan``; ``review`` is
    ``audit``.  ``None`` for a name that is not a known stage."""
    key = name.strip().lower()
    key = _STAGE_ALIASES.get(key, key)
    if key.startswith("spec-"):
        key = key[len("spec-") :]
    return key if key in _KNOWN_STAGES else None


def _stage_key(name: str) -> str:
    # One spelling per name: "café" typed precomposed or decomposed prints
    # the same, and was two stages (and a --from that missed).
    return unicodedata.normalize("NFC", name.strip().lower())


def _check_printable(name: str, where: str, what: str) -> None:
    # Names are printed in banners and answer lines and put into prompts:
    # an ESC drove the terminal, a newline split an agent's line in two.
    if not name.isprintable() or len(name) > 100:
        raise PipelineError(f"{where}: {what} must be at most 100 printable characters")


def canonical_agent(name: str) -> str | None:
    """The reference's normalisation: lowercase, ``-`` and spaces to ``_``,
    trim ``_``, then the first of gemini*, claude*, code*, *codex*, gpt*."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_").strip("_")
    if key in KNOWN_AGENTS:
        return key
    if key.startswith("gemini"):
        return "gemini"
    if key.startswith("claude"):
        return "claude"
    if key.startswith("code"):
        return "code"
    if "codex" in key:
        return "gpt_codex"
    if key.startswith("gpt"):
        return "gpt_pro"
    return None


@attrs.frozen(kw_only=True, slots=True)
class Quorum:
    """How many agents must agree: ``all``, ``majority``, or at least ``k``."""

    policy: Literal["all", "majority", "k"] = "majority"
    k: int | None = None

    def required(self, panel: int) -> int:
        if self.policy == "all":
            return panel
        if self.policy == "majority":
            return panel // 2 + 1
        assert self.k is not None
        return self.k

    def describe(self) -> str:
        return f"{self.k} of n" if self.policy == "k" else self.policy

    def to_json(self) -> Any:
        return self.k if self.policy == "k" else self.policy

    @classmethod
    def parse(cls, value: Any, where: str) -> Quorum:
        if isinstance(value, int) and not isinstance(value, bool):  # (true is no number of agents)
            if value < 1:
                raise PipelineError(f"{where}: quorum must be at least 1, got {value}")
            return cls(policy="k", k=value)
        if value in ("all", "majority"):
            return cls(policy=value)
        # TOML hands over dates, floats and arrays too: a date's repr read
        # "datetime.date(1979, 5, 27)".
        got = repr(value) if isinstance(value, str) else f"{value} ({type(value).__name__})"
        raise PipelineError(f"{where}: quorum must be 'all', 'majority' or a whole number, got {got}")


def _a_name(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise PipelineError(f"{type(instance).__name__}.{attribute.name} must be a non-empty string, got {value!r}")
    if not value.isprintable():
        # Shown in banners and metrics tables: an ESC drove the terminal.
        raise PipelineError(f"{type(instance).__name__}.{attribute.name} must be printable characters, got {value!r}")


@attrs.frozen(kw_only=True, slots=True)
class AgentSpec:
    """How to reach one agent: which provider and model.  Checked when
    built: a model of None used to start a run and kill its metrics actor."""

    name: str = attrs.field(validator=_a_name)
    provider: str = attrs.field(default="sim", validator=_a_name)
    model: str = attrs.field(validator=_a_name)


@attrs.frozen(kw_only=True, slots=True)
class StageSpec:
    """One validated stage of a :class:`Pipeline`: its panel of agents, in
    order, and its ``mode`` (``sequential`` or ``parallel``), the fields each
    answer must hold, the field the decision is taken on, the quorum and
    the aggregator (if any).  Immutable."""

    name: str
    agents: tuple[str, ...]
    mode: Mode
    required_fields: tuple[str, ...]
    decision_field: str
    quorum: Quorum
    aggregator: str | None

    @property
    def quorum_required(self) -> int:
        return self.quorum.required(len(self.agents))


@attrs.frozen(kw_only=True, slots=True)
class Pipeline:
    """A validated pipeline: its stages in order (panel, mode, quorum,
    aggregator, required and decision fields) and its agents (provider
    and model).  Build it with :func:`parse_pipeline` (TOML) or
    :func:`pipeline_from_dict`; immutable, so one pipeline can serve any
    number of concurrent runs."""

    stages: tuple[StageSpec, ...]
    agents: Mapping[str, AgentSpec] = attrs.field(eq=False)
    # Stage name -> each seat's provider: derived once (every agent's call
    # carries its stage's), and again by evolve when the agents change.
    _seat_providers: Mapping[str, tuple[str, ...]] = attrs.field(init=False, eq=False, repr=False)

    @_seat_providers.default
    def _providers_by_seat(self) -> Mapping[str, tuple[str, ...]]:
        agents = self.agents
        return {
            s.name: tuple(agents[a].provider if a in agents else "" for a in s.agents) for s in self.stages
        }

    def seat_providers(self, stage: str) -> tuple[str, ...]:
        """The provider of each seat of ``stage``'s panel, in panel order."""
        return self._seat_providers[stage]

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise PipelineError(
            f"unknown stage {name!r}; this pipeline has: {', '.join(s.name for s in self.stages)}"
        )

    def resolve_stage(self, name: str) -> StageSpec:
        """Look a stage up by any accepted spelling (``Plan``, ``spec-plan``)."""
        canonical = canonical_stage(name)
        if canonical is None:
            key = _stage_key(name)
            canonical = next((s.name for s in self.stages if _stage_key(s.name) == key), name.strip().lower())
        return self.stage(canonical)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def to_json(self) -> dict[str, Any]:
        return {
            "agents": {
                name: {"provider": spec.provider, "model": spec.model}
                for name, spec in sorted(self.agents.items())
            },
            "stages": [
                {
                    "name": s.name,
                    "agents": list(s.agents),
                    "mode": s.mode,
                    "required_fields": list(s.required_fields),
                    "decision_field": s.decision_field,
                    "quorum": s.quorum.to_json(),
                    "aggregator": s.aggregator,
                }
                for s in self.stages
            ],
        }

    def canonical_json(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def with_agents(self, overrides: Mapping[str, AgentSpec]) -> Pipeline:
        return attrs.evolve(self, agents={**self.agents, **overrides})


def default_pipeline() -> Pipeline:
    """plan, tasks, implement (sequential), validate, audit, unlock
    (parallel); gemini, claude, gpt_pro, plus gpt_codex for implement: each
    known stage as the reference runs it."""
    data = {"stages": [{"name": name} for name in ("plan", "tasks", "implement", "validate", "audit", "unlock")]}
    return pipeline_from_dict(data, source="default pipeline")


MAX_PIPELINE_FILE = 16 * 2**20  # thousands of stages fit in far less


def load_pipeline(path: str, *, one_provider: bool = False) -> Pipeline:
    """Read and validate a pipeline TOML file.  ``one_provider``: every
    agent will be put on one provider (``--provider``), so none can be left
    on the simulator beside real ones."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_PIPELINE_FILE + 1)  # /dev/zero was read until MemoryError
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such pipeline file") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read pipeline file: {exc.strerror}") from None
    if len(raw) > MAX_PIPELINE_FILE:
        raise PipelineError(f"{path}: a pipeline file must be at most {MAX_PIPELINE_FILE // 2**20} MiB")
    try:
        # utf-8-sig: an editor's byte-order mark is not a TOML error.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{path}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); TOML files are UTF-8"
        ) from None
    return parse_pipeline(text, source=path, one_provider=one_provider)


def parse_pipeline(text: str, *, source: str = "<pipeline>", one_provider: bool = False) -> Pipeline:
    """Read and validate a pipeline given as TOML text."""
    if not isinstance(text, str):
        # tomllib's own message for bytes says the reverse of the truth.
        raise PipelineError(f"{source}: the pipeline must be TOML text (a str), got {type(text).__name__}")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:
        raise PipelineError(f"{source}: invalid TOML: nested too deeply") from None
    pipeline = pipeline_from_dict(data, source=source, one_provider=one_provider)
    # In a file, an [agents] entry no stage lists is a typo ([agents.gemnii])
    # or another spelling ([agents.Gemini]): it was dropped without a word
    # and the agent kept its model.  (A dict built in code may declare a
    # pool and use part of it.)
    declared = data.get("agents", {})
    unused = sorted(name for name in declared if name not in pipeline.agents)
    if unused:
        meant = [
            f"[agents.{known}] sets {known}'s model"
            for known in dict.fromkeys(canonical_agent(name) for name in unused)
            if known is not None and known in pipeline.agents
        ]
        raise PipelineError(
            f"{source}: {', '.join(map(repr, unused))} declared under [agents] but listed by no stage"
            + (f" ({'; '.join(meant)})" if meant else "")
        )
    return pipeline


_DEFAULT_PANEL = ("gemini", "claude", "gpt_pro")
_STAGE_KEYS = {"name", "agents", "mode", "required_fields", "decision_field", "quorum", "aggregator"}
_TOP_KEYS = {"stages", "agents", "defaults"}
_DEFAULT_KEYS = {"agents", "mode", "quorum", "aggregator"}


def _no_aggregator(value: Any) -> bool:
    # false or "" say "none" (None: not given).  By identity: 0 == False,
    # and `aggregator = 0` read as "none" while other numbers were refused.
    return value is None or value is False or value == ""


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PipelineError(f"{where}: must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def pipeline_from_dict(
    data: Mapping[str, Any], *, source: str, stored: bool = False, one_provider: bool = False
) -> Pipeline:
    """Validate a decoded pipeline (TOML or stored JSON).

    ``stored``: a run's own stored pipeline, accepted once by the version
    that ran it.  ``one_provider``: see :func:`load_pipeline`.  The checks that only guard new input (names, and decision
    fields no agents could disagree on) are left out, so a run started
    before they existed can still be resumed or rerun."""
    fresh = not stored
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PipelineError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise PipelineError(f"{source}: [defaults] must be a table")
    # A misspelt default would otherwise be dropped and every stage run with
    # the built-in value instead of the one the file asks for.
    unknown = set(defaults) - _DEFAULT_KEYS
    if unknown:
        raise PipelineError(
            f"{source}: [defaults]: unknown key(s) {', '.join(sorted(unknown))}; "
            f"known keys are {', '.join(sorted(_DEFAULT_KEYS))}"
        )

    declared: dict[str, AgentSpec] = {}
    agents_table = data.get("agents", {})
    if not isinstance(agents_table, Mapping):
        raise PipelineError(f"{source}: [agents] must be a table")
    for raw_name, cfg in agents_table.items():
        where = f"{source}: agent {raw_name!r}"
        if not isinstance(cfg, Mapping):
            raise PipelineError(f"{where}: must be a table")
        bad = set(cfg) - {"provider", "model"}
        if bad:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        name = str(raw_name)  # declared agents keep their exact name
        if not name.strip():
            raise PipelineError(f"{where}: an agent needs a name that is not blank")
        if fresh:
            _check_printable(name, where, "an agent's name")
        model = cfg.get("model", KNOWN_AGENTS.get(name))
        if model is not None and not isinstance(model, str):
            raise PipelineError(f"{where}: model must be a string, got {model!r}")
        if not isinstance(model, str) or not (model.strip() if fresh else model):
            raise PipelineError(f"{where}: needs a model")
        provider = cfg.get("provider", "sim")
        if not isinstance(provider, str) or not (provider.strip() if fresh else provider):
            raise PipelineError(f"{where}: provider must be a non-empty string")
        declared[name] = AgentSpec(name=name, provider=provider, model=model)

    def resolve_agent(raw: str, where: str) -> str:
        if raw in declared:
            return raw
        name = canonical_agent(raw)
        if name is None:
            raise PipelineError(
                f"{where}: unknown agent {raw!r}; known agents are "
                f"{', '.join(sorted(set(KNOWN_AGENTS) | set(declared)))} "
                "(or declare it under [agents])"
            )
        return name

    def resolved_panel(listed: Sequence[str], where: str) -> tuple[str, ...]:
        """The agents ``listed`` names, resolved; an agent listed twice,
        in either spelling, is refused naming both spellings."""
        agents = tuple(resolve_agent(a, where) for a in listed)
        panel: set[str] = set()  # a set: a slice per agent was quadratic (5 s at 8,000)
        for agent in agents:
            if agent in panel:
                spellings = [a for a, c in zip(listed, agents) if c == agent]
                raise PipelineError(f"{where}: agent {agent!r} is listed twice ({', '.join(map(repr, spellings))})")
            panel.add(agent)
        return agents

    default_panel = (
        _str_list(defaults["agents"], f"{source}: [defaults]: agents") if "agents" in defaults else _DEFAULT_PANEL
    )
    # Checked even when every stage overrides them: a bad default used to
    # pass until a stage came to use it.
    at_defaults = f"{source}: [defaults]"
    if "agents" in defaults:
        if not default_panel:
            raise PipelineError(f"{at_defaults}: agents must name at least one agent")
        resolved_panel(default_panel, at_defaults)
    if defaults.get("mode", "sequential") not in ("sequential", "parallel"):
        raise PipelineError(f"{at_defaults}: mode must be 'sequential' or 'parallel', got {defaults['mode']!r}")
    if "quorum" in defaults:
        Quorum.parse(defaults["quorum"], at_defaults)
    default_aggregator = defaults.get("aggregator")
    if not _no_aggregator(default_aggregator):
        if not isinstance(default_aggregator, str):
            raise PipelineError(f"{at_defaults}: aggregator must be an agent name")
        resolve_agent(default_aggregator, at_defaults)

    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise PipelineError(f"{source}: needs at least one [[stages]] entry")
    stages: list[StageSpec] = []
    seen: set[str] = set()
    used: set[str] = set()
    for index, raw in enumerate(raw_stages, start=1):
        if not isinstance(raw, Mapping):
            raise PipelineError(f"{source}: stage #{index} must be a table")
        raw_name = raw.get("name")
        if not isinstance(raw_name, str) or not raw_name.strip():
            raise PipelineError(f"{source}: stage #{index} needs a name")
        where = f"{source}: stage {raw_name!r}"
        if fresh:
            _check_printable(raw_name, where, "a stage's name")
        bad = set(raw) - _STAGE_KEYS
        if bad:
            raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
        known = canonical_stage(raw_name)
        if known is None and "required_fields" not in raw:
            raise PipelineError(
                f"{where}: unknown stage; known stages are {', '.join(_KNOWN_STAGES)} "
                "(a custom stage must list its required_fields)"
            )
        # (Stored names are kept as they were written: decisions are keyed on them.)
        name = known or (_stage_key(raw_name) if fresh else raw_name.strip().lower())
        if name in seen:
            raise PipelineError(f"{where}: stage listed twice")
        seen.add(name)

        if "agents" in raw:
            listed = _str_list(raw["agents"], f"{where}: agents")
        elif "agents" in defaults:
            listed = default_panel
        else:
            # (A custom stage gets the default roster: it was let through
            # here, its undeclared agents answering from the simulator.)
            listed = _KNOWN_PANELS.get(known, _DEFAULT_PANEL) if known is not None else _DEFAULT_PANEL
            real = sorted({spec.provider for spec in declared.values()} - {"sim"})
            unset = [a for a in listed if a not in declared]
            if fresh and real and unset and not one_provider:
                # The reference's roster brings an agent the file never
                # set up: it would answer from the simulator beside real
                # models, without a word.
                raise PipelineError(
                    f"{where}: the stage's agents by default are {', '.join(listed)}, and "
                    f"{', '.join(unset)} {'has' if len(unset) == 1 else 'have'} no [agents] entry while others "
                    f"use {', '.join(real)}; declare {'it' if len(unset) == 1 else 'them'} or list the stage's agents"
                )
        agents = resolved_panel(listed, where)
        if not agents:
            raise PipelineError(f"{where}: needs at least one agent")
        panel = set(agents)
        if fresh:
            # A name declared under [agents] is kept as written, but one
            # that reads as a known agent ([agents.GPT-5]) beside that very
            # agent is it twice: two gpt_pro seats, one vote counted twice.
            # (Two declared variants, claude-opus and claude-haiku, are two
            # agents of the file's own.)
            for agent in agents:
                known_as = canonical_agent(agent) if agent in declared else None
                if known_as is not None and known_as != agent and known_as in panel:
                    raise PipelineError(
                        f"{where}: {agent!r} (declared under [agents]) reads as the known agent "
                        f"{known_as!r}, which the stage lists too; name one of them differently"
                    )
        used.update(agents)

        reference_mode = "parallel" if known in _PARALLEL_STAGES else "sequential"
        mode = raw.get("mode", defaults.get("mode", reference_mode))
        if mode not in ("sequential", "parallel"):
            raise PipelineError(f"{where}: mode must be 'sequential' or 'parallel', got {mode!r}")

        if "required_fields" in raw:
            specific = _str_list(raw["required_fields"], f"{where}: required_fields")
        else:
            assert known is not None
            specific = _KNOWN_STAGES[known]
        decision_field = raw.get("decision_field", specific[0] if specific else "stage")
        if not isinstance(decision_field, str) or not decision_field:
            raise PipelineError(f"{where}: decision_field must be a field name")
        if fresh:
            # Field names go into every prompt, as agent names do.
            for field in (*specific, decision_field):
                _check_printable(field, where, f"a field's name ({field!r})")
        # The field consensus compares is required too: agents that all
        # left it out would otherwise "agree" on nothing and the stage pass.
        required = tuple(dict.fromkeys(ALWAYS_REQUIRED + specific + (decision_field,)))

        quorum = Quorum.parse(raw.get("quorum", defaults.get("quorum", "majority")), where)
        if quorum.required(len(agents)) > len(agents):
            inherited = " (from [defaults])" if "quorum" not in raw else ""
            raise PipelineError(
                f"{where}: quorum {quorum.k}{inherited} is larger than the panel of {len(agents)} agent(s)"
            )
        if fresh and decision_field == "agent" and len(agents) > 1:
            # Each agent answers with its own name there: no two ever agree,
            # and at a quorum of 1 every answer ties with every other.
            raise PipelineError(
                f"{where}: decision_field 'agent' differs for every agent, so {len(agents)} agents"
                " can never agree; name the field the agents decide on"
            )
        if fresh and decision_field == "stage" and len(agents) > 1:
            # Every agent answers with the stage's name there: they always
            # "agree", whatever they decided (a stage with no fields of its
            # own compared it by default, and passed at any disagreement).
            # At a quorum of 1 too: the coordinator's own check of the
            # field then never saw a dissent, and a conflict passed as ok.
            given = "decision_field 'stage'" if "decision_field" in raw else "with no required_fields, the stage"
            raise PipelineError(
                f"{where}: {given} is the same for every agent, so its agents would always agree;"
                " name the field the agents decide on (decision_field, and required_fields)"
            )

        aggregator_raw = raw.get("aggregator", defaults.get("aggregator", "gpt_pro"))
        aggregator: str | None
        if _no_aggregator(aggregator_raw):
            aggregator = None
        elif not isinstance(aggregator_raw, str):
            raise PipelineError(f"{where}: aggregator must be an agent name")
        else:
            aggregator = resolve_agent(aggregator_raw, where)
            if aggregator not in agents:
                if "aggregator" in raw:
                    raise PipelineError(
                        f"{where}: aggregator {aggregator!r} is not in the stage's agents {list(agents)}"
                    )
                aggregator = None  # the default aggregator is simply absent here
        stages.append(
            StageSpec(
                name=name,
                agents=agents,
                mode=mode,
                required_fields=required,
                decision_field=decision_field,
                quorum=quorum,
                aggregator=aggregator,
            )
        )

    specs = {
        name: declared.get(name) or AgentSpec(name=name, model=KNOWN_AGENTS[name])
        for name in sorted(used)
    }
    return Pipeline(stages=tuple(stages), agents=specs)


def pipeline_with_panel(stage: str, agents: Sequence[str], *, mode: Mode = "parallel") -> Pipeline:
    """A one-stage pipeline with a custom panel (benchmarks and scale tests)."""
    if isinstance(agents, str):
        # Iterated, "claude" made a panel of six agents: c, l, a, u, d, e.
        raise PipelineError(f"agents must be a sequence of agent names, not the string {agents!r}")
    declared = {a: {"provider": "sim", "model": "sim-model"} for a in agents}
    return pipeline_from_dict(
        {
            "agents": declared,
            "stages": [
                {"name": stage, "agents": list(agents), "mode": mode, "aggregator": ""}
            ],
        },
        source="panel",
    )
