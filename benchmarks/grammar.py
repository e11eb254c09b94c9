"""Grammar overhead: decode tok/s with and without a JSON-schema constraint, on the demo model.

Both runs decode exactly --tokens tokens per request from the same chat prompt: the plain run
ignores EOS, the constrained one follows a schema (an array of at least 64 small objects) that
cannot finish sooner. Reported per batch size: best of --repeats, and the extra milliseconds per
step the grammar costs (computing and applying the masks, advancing the matchers).

    python benchmarks/grammar.py --batch 1 16
"""

from __future__ import annotations

import argparse
import time

from levante.engine import LLM, EngineConfig, SamplingParams
from levante.engine.grammar import json_schema_grammar

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "colour": {"enum": ["red", "green", "blue"]},
                    "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                },
                "required": ["name", "colour", "count"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PROMPT = [{"role": "user", "content": "List sixty-four fruits as JSON with a colour and a count each."}]


def run(llm: LLM, batch: int, tokens: int, grammar: str | None) -> float:
    """Generated tokens per second over the whole batch."""
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=grammar is None, grammar=grammar)
    start = time.perf_counter()
    results = llm.generate([PROMPT] * batch, [params] * batch)
    elapsed = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == batch * tokens, f"expected {batch * tokens} tokens, got {produced}"
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    llm = LLM(engine=EngineConfig(kv_cache_memory=0.5))
    grammar = json_schema_grammar(SCHEMA)
    run(llm, 2, 16, grammar)  # warm-up: builds the grammar tokenizer, compiles the grammar
    print(f"demo model, {args.tokens} tokens per request, best of {args.repeats}")
    print(f"{'batch':>5} {'plain tok/s':>12} {'json tok/s':>11} {'ratio':>6} {'extra ms/step':>14}")
    for batch in args.batch:
        plain = max(run(llm, batch, args.tokens, None) for _ in range(args.repeats))
        constrained = max(run(llm, batch, args.tokens, grammar) for _ in range(args.repeats))
        extra_ms = (1 / constrained - 1 / plain) * 1000 * batch
        print(f"{batch:>5} {plain:>12.1f} {constrained:>11.1f} {constrained / plain:>6.2f} {extra_ms:>14.2f}")


if __name__ == "__main__":
    main()
