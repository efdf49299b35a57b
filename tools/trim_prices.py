"""Trim LiteLLM's price table to what Conclave prices.

Usage: python tools/trim_prices.py WHEEL_EXTRACTED_JSON LITELLM_VERSION > actors/_model_prices.json

Keeps chat/responses/completion models of the openai, anthropic, gemini and
vertex_ai-language-models providers, and only the per-token fields Conclave
reads (standard tier, one-hour cache writes and the ``_above_<N>k_tokens`` tiers; no batch,
priority or flex variants, no audio/image prices).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys

PROVIDERS = {"openai", "anthropic", "gemini", "vertex_ai-language-models"}
MODES = {"chat", "responses", "completion"}
BASE = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "cache_creation_input_token_cost_above_1hr",
    "output_cost_per_reasoning_token",
)
KEEP = re.compile(r"^(" + "|".join(BASE) + r")(_above_\d+k_tokens)?$")
META = ("litellm_provider", "mode", "max_input_tokens", "max_output_tokens")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python tools/trim_prices.py WHEEL_EXTRACTED_JSON LITELLM_VERSION > actors/_model_prices.json")
    path, version = sys.argv[1], sys.argv[2]
    raw = open(path, "rb").read()
    table = json.loads(raw)
    out: dict[str, object] = {
        "_meta": {
            "source": "BerriAI/litellm model_prices_and_context_window.json, as shipped in the "
            "litellm wheel (litellm/model_prices_and_context_window_backup.json)",
            "litellm_version": version,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "license": "MIT (BerriAI/litellm)",
            "units": "USD per single token",
            "trimmed_by": "tools/trim_prices.py: providers " + ", ".join(sorted(PROVIDERS))
            + "; modes " + ", ".join(sorted(MODES))
            + "; standard, one-hour cache-write and _above_<N>k_tokens prices only",
        }
    }
    for name in sorted(table):
        entry = table[name]
        if not isinstance(entry, dict) or name == "sample_spec":
            continue
        if entry.get("litellm_provider") not in PROVIDERS or entry.get("mode") not in MODES:
            continue
        if "input_cost_per_token" not in entry or "output_cost_per_token" not in entry:
            continue
        kept = {k: entry[k] for k in META if k in entry}
        kept.update({k: v for k, v in sorted(entry.items()) if KEEP.match(k)})
        out[name] = kept
    json.dump(out, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
