"""Schema migrations after version 1 (the walking skeleton's schema).

Each entry is one step, applied by :func:`store._schema.migrate` in one
``BEGIN IMMEDIATE`` transaction together with ``PRAGMA user_version``.
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

LATER: tuple[str, ...] = (V2,)
