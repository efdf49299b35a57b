"""The agent actor: one per agent of a run.

It answers :class:`~messages.AgentRequest`s one at a time: calls the model
through the gateway (retrying what is retryable), reports every attempt's
usage to the metrics accumulator, makes its output durable through the
store writer (a failed attempt too, before it retries, when its provider
may have billed it), and only then replies to the coordinator - so a
decision can never be made on an output that is not on disk.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from messages import (
    ActorStopped,
    AgentOutput,
    AgentReply,
    AgentRequest,
    AgentRetrying,
    CompletionRequest,
    CompletionResult,
    Outbox,
    PersistEvent,
    PersistOutput,
    ProviderTimeout,
    StoreWrite,
    Undelivered,
    UsageRecorded,
    fail_pending,
    PendingReply,
    reply_pair,
)

from ._classify import classify
from ._consensus import extract_json_text, parse_output
from ._pipeline import AgentSpec, Pipeline
from ._retry import RetryPolicy
from ._store_writer import write_durably


def build_prompt(request: AgentRequest, fields: tuple[str, ...], aggregate: bool) -> str:
    """The prompt of ``request``: who is asked, the goal, the JSON
    ``fields`` to answer with (plus the consensus block when
    ``aggregate``) and the earlier answers of the stage.  Pure: the same
    request gives the same text."""
    key = request.key
    lines = [
        f"You are agent {key.agent} in stage {key.stage} of spec {request.spec_id}.",
        f"Goal: {request.goal or '(none given)'}",
        "Answer with one JSON object holding the fields: " + ", ".join(fields) + ".",
    ]
    if aggregate:
        lines.append(
            'As the aggregator, add "consensus": {"agreements": [...], "conflicts": [...]}.'
        )
    for prior in request.context:
        # (Already cut to what later agents see: see for_later_agents.)
        lines.append(f"Earlier answer from {prior.agent}:\n{prior.content}")
    return "\n".join(lines)


_RAW_CONTEXT = 5000


def for_later_agents(content: str) -> str:
    """What later agents of a sequential stage are shown of an answer, as
    the reference passes it: the JSON object it holds, in full; an answer
    without one, cut at 5,000 characters.  (Every answer was cut: a long
    plan reached the aggregator as JSON that no longer closed.)  Worked
    out once per answer, by the coordinator: per prompt, a stage of N
    agents parsed N**2 / 2 answers."""
    extracted = extract_json_text(content)
    return extracted if extracted is not None else content[:_RAW_CONTEXT]


@attrs.define(kw_only=True)
class Agent:
    """The actor of one agent of a run (see the module docstring): serves
    its inbox one request at a time, calling its model through the gateway
    and retrying per ``retry``."""

    spec: AgentSpec
    pipeline: Pipeline
    gateway: Outbox[CompletionRequest]
    metrics: Outbox[UsageRecorded]
    store: Outbox[StoreWrite]
    retry: RetryPolicy
    seed: int
    # Progress for humans (best effort, never blocks): each retry and its wait.
    publish: Callable[[AgentRetrying], None] | None = None
    # Make each failed attempt durable before going on: its provider may
    # charge for it (BaseProvider.bills).  The simulator's are left to group
    # commit: a soak fails a tenth of its attempts, and each would force a
    # commit of its own.
    durable_failures: bool = True

    async def run(self, inbox: trio.MemoryReceiveChannel[AgentRequest]) -> None:
        """Serve requests until the inbox closes.  Requests still queued
        when the agent stops are failed (their repliers see ActorStopped)."""
        try:
            while True:
                # A request that is already queued (the coordinator
                # dispatches before a new agent first runs) is taken without
                # the schedule point trio's receive() makes even then; the
                # turn's first await on the gateway is its checkpoint.
                request: AgentRequest | None
                try:
                    request = inbox.receive_nowait()
                except trio.WouldBlock:
                    request = None
                except trio.EndOfChannel:
                    break
                if request is None:
                    # Parked outside the except block: an idle agent must
                    # not keep a caught WouldBlock (and its traceback) alive.
                    try:
                        request = await inbox.receive()
                    except trio.EndOfChannel:
                        break
                reply = await self.handle(request)
                if request.reply_to is not None:
                    try:
                        # The coordinator's inbox is unbounded: this never waits.
                        await request.reply_to.send_eager(reply)
                    except Undelivered:
                        raise  # an interceptor swallowed it: the coordinator would wait for ever
                    except ActorStopped:
                        # The run is over (or being cancelled): a late reply
                        # has nobody to go to; its output is already durable.
                        pass
        finally:
            fail_pending(inbox)

    async def handle(self, request: AgentRequest) -> AgentReply:
        """Answer one request: attempts until one is accepted or the retry
        policy gives up (then an ``AgentReply`` with ``error``, not an
        exception).  An accepted output is durable before it is returned.
        A resumed request (``first_attempt`` > 1) first sleeps its
        ``first_wait``, the pause its last durable failure earned.

        A checkpoint.  Cancelled: the model call in flight is abandoned
        (its reply slot closed or left), and the attempt it was may have
        been billed with no output stored - a resume asks again under the
        same attempt number; attempts finished before are stored (failed
        ones durably when ``durable_failures``).  Raises
        :class:`~messages.ActorStopped` when the gateway or store writer
        has stopped or a durable write is refused."""
        stage = self.pipeline.stage(request.key.stage)
        aggregate = stage.aggregator == self.spec.name
        prompt = build_prompt(request, stage.required_fields, aggregate)
        key = request.key
        attempt = request.first_attempt - 1  # > 0 on resume: earlier attempts are durable
        providers = self.pipeline.seat_providers(stage.name)
        if request.first_wait > 0:
            # A resume, in the pause its last failed attempt earned.
            now = trio.current_time()
            resume_at = self.retry.resume_at(now, request.first_wait)
            if self.publish is not None:  # else a long reset's wait looked like a hang
                self.publish(
                    AgentRetrying(key=key, attempt=attempt, error="before the interruption", delay=resume_at - now)
                )
            await trio.sleep_until(resume_at)
        while True:
            attempt += 1
            reply, pending = reply_pair("model call")
            # One reading of the clock for the call's deadline, its start and
            # its timeout (no await between them: the same instant).
            started = trio.current_time()
            call = CompletionRequest(
                key=key,
                attempt=attempt,
                spec_id=request.spec_id,
                provider=self.spec.provider,
                model=self.spec.model,
                prompt=prompt,
                response_fields=stage.required_fields,
                decision_field=stage.decision_field,
                aggregate=aggregate,
                panel=stage.agents,
                panel_providers=providers,
                deadline=started + self.retry.call_timeout,
                reply_to=reply,
            )
            result = await self._call(call, pending)
            finished = trio.current_time()
            completion = result.completion
            usage = completion.usage if completion is not None else result.usage
            # The model that answered, as the server names it: a failed
            # attempt's usage was priced as the agent's configured model
            # (an alias was unpriced, a mini model charged 17x).
            model = completion.model if completion is not None else (result.model or self.spec.model)
            # Priced when the server's own name for the model is unknown.
            asked = (completion.requested_model if completion is not None else result.requested_model) or self.spec.model
            await self.metrics.send_eager(  # the accumulator never waits on us
                UsageRecorded(
                    key=key,
                    attempt=attempt,
                    model=model,
                    provider=self.spec.provider,
                    usage=usage,
                    requested_model=asked,
                )
            )
            if completion is not None:
                output = AgentOutput(
                    key=key,
                    attempt=attempt,
                    status="accepted",
                    content=completion.content,
                    format="json" if parse_output(completion.content) is not None else "text",
                    usage=usage,
                    model=model,
                    provider=self.spec.provider,
                    started_at=started,
                    finished_at=finished,
                )
                await self._persist(output)
                return AgentReply(key=key, attempts=attempt, output=output)

            error = result.error
            assert error is not None
            failed = AgentOutput(
                key=key,
                attempt=attempt,
                status="failed",
                content="",
                format="text",
                usage=usage,
                model=model,
                provider=self.spec.provider,
                error=f"{error.kind}: {error}",  # the kind lets a resume judge retryability
                started_at=started,
                finished_at=finished,
            )
            # Durable before anything else happens to this agent: the attempt
            # may have been billed, and a crash in the backoff that follows
            # (the writer holds unacknowledged writes up to a second) erased
            # it - its usage gone from the metrics, and a resume numbered
            # its retry as the same attempt.
            if self.durable_failures:
                await self._persist(failed)
            else:
                await self.store.send_eager(PersistOutput(output=failed))
            # Authentication is permanent here: the provider has already
            # refreshed its token once and retried (the 401-refresh-once rule).
            if not self.retry.should_retry(error, self.retry.round_attempt(attempt)):
                # On the event log beside the retries: why this agent stopped
                # (it was only in the stored output, and on the terminal).
                detail = {"error": error.kind, "message": str(error)}
                too_far = self.retry.wait_refused(classify(error).retry_after)
                if too_far is not None:
                    detail["reason"] = too_far
                gave_up = PersistEvent.of_attempt(key, attempt, "gave_up", detail)
                if self.durable_failures:
                    # As durable as the failure: a resume after a crash here
                    # judged the attempt again, without its reset (a 429
                    # past max_wait read as one to retry), and asked again.
                    await write_durably(
                        self.store, gave_up, "logging an event", f"store writer could not log {self.spec.name}'s gave_up"
                    )
                else:
                    await self.store.send(gave_up)
                why = f" ({too_far})" if too_far is not None else ""
                return AgentReply(key=key, attempts=attempt, output=None, error=f"{error.kind}: {error}{why}")
            delay = self.retry.delay(error, key, attempt, self.seed, spec_id=request.spec_id)
            now = trio.current_time()
            resume_at = self.retry.resume_at(now, delay)
            await self.store.send(
                PersistEvent.of_attempt(
                    key,
                    attempt,
                    "retry",
                    {"error": error.kind, "message": str(error), "delay_s": round(resume_at - now, 3)},
                )
            )
            if self.publish is not None:
                self.publish(
                    AgentRetrying(key=key, attempt=attempt, error=f"{error.kind}: {error}", delay=resume_at - now)
                )
            await trio.sleep_until(resume_at)

    async def _call(
        self, call: CompletionRequest, pending: PendingReply[CompletionResult]
    ) -> CompletionResult:
        # At the call's own deadline: the instant move_on_after(call_timeout)
        # would compute (the call was built in this step), without reading
        # the clock again.
        with trio.move_on_at(call.deadline) as scope:
            try:
                await self.gateway.send_eager(call)
            except BaseException:
                assert call.reply_to is not None
                call.reply_to.close()
                raise
            return await pending.receive()
        assert scope.cancelled_caught
        return CompletionResult(
            key=call.key,
            attempt=call.attempt,
            error=ProviderTimeout(f"operation timed out after {int(self.retry.call_timeout * 1000)}ms"),
        )

    async def _persist(self, output: AgentOutput) -> None:
        await write_durably(
            self.store,
            PersistOutput(output=output),
            "persisting an output",
            f"store writer could not persist {output.key.agent}'s output",
        )

