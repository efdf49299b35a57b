"""Conclave's actors and the runtime that wires them.

Embed it in any trio program::

    async with actors.open_orchestrator(store="conclave.db") as orch:
        result = await orch.run("SPEC-1", goal="...")

Agents, the provider gateway, the consensus coordinator, the metrics
accumulator and the store writer are trio tasks that share no mutable state
and talk only through the typed channels of :mod:`messages`.
"""

from . import _auth_api, _providers_api
from ._agent import Agent, build_prompt
from ._auth_api import *  # noqa: F403  (device-code login and tokens, listed there)
from ._breaker import BreakerPolicy, BreakerTicket, CircuitBreaker
from ._classify import Classification, classify
from ._consensus import ADVANCING, Verdict, compute_verdict, parse_output
from ._coordinator import AnswerNotStored, Coordinator, DecisionNotDurable, RunContext
from ._digest import compute_digest
from ._gateway import Gateway
from ._health import HealthRegistry, Permit, ProviderHealth
from ._ids import new_branch_id, new_run_id, short_branch_id
from ._budget import BudgetExceeded, parse_budget
from ._context_window import context_window
from ._metrics import MetricsAccumulator
from ._pricing import ModelPrice, PriceFileError, PriceTable
from ._session_metrics import SessionMetrics
from ._snapshots import MetricsHub, MetricsSubscription
from ._pipeline import (
    KNOWN_AGENTS,
    AgentSpec,
    Pipeline,
    PipelineError,
    Quorum,
    StageSpec,
    canonical_agent,
    canonical_stage,
    default_pipeline,
    load_pipeline,
    parse_pipeline,
    pipeline_from_dict,
    pipeline_with_panel,
)
from ._gc import THROUGHPUT_THRESHOLDS, throughput_gc
from ._provider import BaseProvider, MockProvider
from ._providers_api import *  # noqa: F403  (the provider layer's names, listed there)
from ._resume import ResumeError
from ._ratelimit import GateRefused, RateLimitGate
from ._retry import RetryPolicy
from ._runtime import (
    EDGES,
    ConfigError,
    Limits,
    Orchestrator,
    RunExists,
    RunResult,
    StageResult,
    open_orchestrator,
)
from ._sequencer import AlreadyDecided, DecisionSequencer, SequencerBusy, Ticket
from ._simulator import Latency, SimulatedProvider
from ._soak import SoakConfig, SoakReport, default_soak_plan, run_soak, soak
from ._store_writer import StoreWriter

__all__ = [
    "THROUGHPUT_THRESHOLDS",
    "throughput_gc",
    "BudgetExceeded",
    "MetricsHub",
    "MetricsSubscription",
    "ModelPrice",
    "PriceFileError",
    "PriceTable",
    "SessionMetrics",
    "context_window",
    "parse_budget",
    "BreakerPolicy",
    "BreakerTicket",
    "CircuitBreaker",
    "Classification",
    "classify",
    "HealthRegistry",
    "Permit",
    "ProviderHealth",
    "GateRefused",
    "RateLimitGate",
    "ADVANCING",
    "EDGES",
    "KNOWN_AGENTS",
    "Agent",
    "AgentSpec",
    "AlreadyDecided",
    "AnswerNotStored",
    "BaseProvider",
    "ConfigError",
    "Coordinator",
    "DecisionNotDurable",
    "DecisionSequencer",
    "Gateway",
    "Latency",
    "Limits",
    "MetricsAccumulator",
    "MockProvider",
    "Orchestrator",
    "Pipeline",
    "PipelineError",
    "Quorum",
    "ResumeError",
    "RetryPolicy",
    "RunContext",
    "RunExists",
    "RunResult",
    "SequencerBusy",
    "SimulatedProvider",
    "SoakConfig",
    "SoakReport",
    "StageResult",
    "StageSpec",
    "StoreWriter",
    "Ticket",
    "Verdict",
    "build_prompt",
    "canonical_agent",
    "canonical_stage",
    "compute_digest",
    "compute_verdict",
    "default_pipeline",
    "default_soak_plan",
    "load_pipeline",
    "new_branch_id",
    "new_run_id",
    "open_orchestrator",
    "parse_output",
    "parse_pipeline",
    "pipeline_from_dict",
    "pipeline_with_panel",
    "run_soak",
    "short_branch_id",
    "soak",
    *_auth_api.__all__,
    *_providers_api.__all__,
]
