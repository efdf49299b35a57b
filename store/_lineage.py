"""Branch lineage: which branch's rows a branch sees, stage by stage.

A run's history is a tree of branches.  The root owns every stage.  A
child forked at stage F (``rerun --from F``) owns F and every later stage,
and inherits each earlier stage from its parent - recursively, so a stage
is always owned by exactly one branch of the lineage.  Nothing of the
parent from F on is visible to the child: an abandoned attempt can never
reach the child's consensus.

This generalises the reference's ``get_responses_for_branch`` (one branch,
exact match, never called, NULL-branch rows for parallel stages) into one
recursive query; every read that feeds consensus or resume goes through
:data:`LINEAGE_CTE`.  Stage order comes from the run's stored pipeline.
Parameters: ``:run`` and ``:branch``.

The CTEs are MATERIALIZED: otherwise SQLite may re-evaluate them (and
re-parse the stored pipeline JSON) for every output row it joins, which
made one stage's read quadratic in the panel size.
"""

from __future__ import annotations

LINEAGE_CTE = """
WITH RECURSIVE
stage_order(stage, idx) AS MATERIALIZED (
    SELECT json_extract(j.value, '$.name'), CAST(j.key AS INTEGER)
    FROM runs r, json_each(r.pipeline, '$.stages') j
    WHERE r.run_id = :run
),
chain(branch_id, parent_branch_id, lo, hi) AS (
    SELECT b.branch_id, b.parent_branch_id, COALESCE(so.idx, 0), 1 << 30
    FROM branches b LEFT JOIN stage_order so ON so.stage = b.fork_stage
    WHERE b.branch_id = :branch AND b.run_id = :run
    UNION ALL
    -- The parent owns, below the child's fork, what it did not inherit.
    SELECT p.branch_id, p.parent_branch_id, COALESCE(so.idx, 0), MIN(c.lo, c.hi)
    FROM chain c
    JOIN branches p ON p.branch_id = c.parent_branch_id
    LEFT JOIN stage_order so ON so.stage = p.fork_stage
),
lineage(branch_id, stage, idx) AS MATERIALIZED (
    SELECT c.branch_id, s.stage, s.idx
    FROM chain c JOIN stage_order s ON s.idx >= c.lo AND s.idx < c.hi
)
"""
