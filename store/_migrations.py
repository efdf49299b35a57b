"""Schema migrations after version 1 (the walking skeleton's schema).

Each entry is one step; :func:`store._schema.migrate` applies the steps a
file lacks in one ``BEGIN IMMEDIATE`` transaction, together with ``PRAGMA
user_version``.
Steps are forward-only and never edited once released: a database written
by any earlier Conclave is brought up to date one step at a time.
"""

from __future__ import annotations

# Version 2: durable resume and branch-aware history.
#
# * agent_outputs.started_at / finished_at: when the call ran (integer ms
#   since the epoch, like every timestamp; the span is the call's duration
#   on the run's clock, which is simulated under the virtual clock).
# * branches.options: what a resume of the branch needs to act exactly like
#   the interrupted process (simulator settings and the like), as JSON.
# * branches.status / halt_reason / digest: each line of history keeps its
#   own outcome, so the parent's stays readable after a rerun moves the
#   run's current branch.
# * indexes for the lineage query and for the event log by kind.
V2 = """
ALTER TABLE agent_outputs ADD COLUMN started_at INTEGER;
ALTER TABLE agent_outputs ADD COLUMN finished_at INTEGER;
ALTER TABLE branches ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
ALTER TABLE branches ADD COLUMN status TEXT;
ALTER TABLE branches ADD COLUMN halt_reason TEXT;
ALTER TABLE branches ADD COLUMN digest TEXT;
UPDATE branches SET
    status = (SELECT r.status FROM runs r
              WHERE r.run_id = branches.run_id AND r.current_branch_id = branches.branch_id),
    halt_reason = (SELECT r.halt_reason FROM runs r
                   WHERE r.run_id = branches.run_id AND r.current_branch_id = branches.branch_id),
    digest = (SELECT r.digest FROM runs r
              WHERE r.run_id = branches.run_id AND r.current_branch_id = branches.branch_id);
CREATE INDEX branches_parent ON branches (parent_branch_id);
CREATE INDEX agent_outputs_stage ON agent_outputs (run_id, stage, branch_id);
CREATE INDEX decisions_stage ON decisions (run_id, stage, branch_id);
CREATE INDEX events_kind ON events (run_id, kind, id);
"""

# Version 3: cache writes, priced apart from fresh input (Anthropic's
# cache_creation_input_tokens, OpenAI's cache_write_tokens).  Parts of the
# input tokens, as cached_input_tokens are; NULL where the usage is unknown,
# like the other counts.  Rows written before are taken as having none.
V3 = """
ALTER TABLE agent_outputs ADD COLUMN cache_write_input_tokens INTEGER;
ALTER TABLE agent_outputs ADD COLUMN cache_write_1h_input_tokens INTEGER;
UPDATE agent_outputs SET cache_write_input_tokens = 0, cache_write_1h_input_tokens = 0 WHERE usage_known = 1;
ALTER TABLE runs ADD COLUMN cache_write_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cache_write_1h_input_tokens INTEGER NOT NULL DEFAULT 0;
"""

LATER: tuple[str, ...] = (V2, V3)

# A read-only connection never migrates, but a database one step behind can
# still be read as the latest schema: TEMP views of the same names (which
# unqualified names resolve to first) add the columns it lacks, with the
# values the migration would give them.  So reading commands keep working
# on files no writing command has opened since an upgrade (a user could not
# list the runs of an old file to resume one).
READ_AS_LATEST: dict[int, str] = {
    # Version 1, the walking skeleton's: V2's columns as V2 fills them in,
    # then V3's.
    1: """
CREATE TEMP VIEW agent_outputs AS SELECT *,
    NULL AS started_at, NULL AS finished_at,
    CASE WHEN usage_known = 1 THEN 0 END AS cache_write_input_tokens,
    CASE WHEN usage_known = 1 THEN 0 END AS cache_write_1h_input_tokens
    FROM main.agent_outputs;
CREATE TEMP VIEW branches AS SELECT b.*, '{}' AS options,
    (SELECT r.status FROM main.runs r
     WHERE r.run_id = b.run_id AND r.current_branch_id = b.branch_id) AS status,
    (SELECT r.halt_reason FROM main.runs r
     WHERE r.run_id = b.run_id AND r.current_branch_id = b.branch_id) AS halt_reason,
    (SELECT r.digest FROM main.runs r
     WHERE r.run_id = b.run_id AND r.current_branch_id = b.branch_id) AS digest,
    b.rowid AS rowid  -- (a view has none: branches are listed in rowid order)
    FROM main.branches b;
CREATE TEMP VIEW runs AS SELECT *,
    0 AS cache_write_input_tokens, 0 AS cache_write_1h_input_tokens
    FROM main.runs;
""",
    2: """
CREATE TEMP VIEW agent_outputs AS SELECT *,
    CASE WHEN usage_known = 1 THEN 0 END AS cache_write_input_tokens,
    CASE WHEN usage_known = 1 THEN 0 END AS cache_write_1h_input_tokens
    FROM main.agent_outputs;
CREATE TEMP VIEW runs AS SELECT *,
    0 AS cache_write_input_tokens, 0 AS cache_write_1h_input_tokens
    FROM main.runs;
""",
}
