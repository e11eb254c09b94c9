"""Prompt-lookup speculation: Levante with and without `--speculative-config`, and llama.cpp's
llama-server, on the same GGUF (the demo model) in one run, one server after the other.

Single stream, greedy chat completions of up to --max-tokens: a copy-heavy set (a function returned
whole, line items into JSON, text with code kept as it is, a list repeated) and a free-form set
(stories, explanations). Decode tok/s per request is (completion tokens − 1) / (end − first token),
timed on the client; the acceptance rate comes from Levante's /metrics (proposed and kept tokens).
Then --streams concurrent requests (all prompts, round robin): output tok/s, speculation on vs off.

    bash benchmarks/build_llama_server.sh   # once; prints the binary's path
    .venv/bin/python benchmarks/speculative.py --llama-server ~/.cache/levante-bench/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI
from serving import free_port, serving

CODE = '''def parse_invoice(text):
    """Split an invoice into its line items: (description, quantity, unit price)."""
    items = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        description, quantity, price = [part.strip() for part in line.split(",")]
        items.append((description, int(quantity), float(price.lstrip("$"))))
    return items
'''
COPYING = {
    "fix_function": "This function crashes on blank lines with spaces. Fix it and return the whole "
    "function, unchanged otherwise:\n\n" + CODE,
    "line_items_json": "Turn these invoice lines into a JSON array of objects with the fields "
    "description, quantity and unit_price:\nOffice chair, 4, $129.00\nStanding desk, 2, $349.50\n"
    "Monitor arm, 4, $59.90\nCable tray, 6, $12.25\nDesk lamp, 4, $24.00\nFootrest, 3, $31.75",
    "translate_keep_code": "Translate into French, keeping every code snippet exactly as it is:\n\n"
    "To start the server, run `levante serve --model ./model --port 8000`. Then send a request "
    "with `curl http://127.0.0.1:8000/v1/chat/completions -d @request.json`. To stop it, press "
    "Ctrl-C; the command `levante keys list` shows the keys.",
    "repeat_list": "Here is a shopping list: apples, pears, oat milk, rye bread, eggs, tomatoes, "
    "basil, olive oil, lemons, rice. Write it again as a numbered list, one item per line, and "
    "then once more in reverse order.",
}
FREE = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "explain": "Explain to a new engineer why databases use indexes and when they hurt.",
    "advice": "Give me five tips for a calm first week at a new job, with a sentence on each.",
}
SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'


async def one(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[int, float, str]:
    """(completion tokens, decode seconds after the first token, text) of one streamed greedy chat."""
    start, first, text, tokens = time.perf_counter(), None, [], 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return tokens, end - (first or start), "".join(text)


def counters(url: str) -> dict[str, float]:
    """Levante's speculation counters from /metrics (empty for other servers)."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            body = r.read().decode()
    except OSError:
        return {}
    found = re.findall(r"^levante:spec_decode_num_(\w+)_total\{[^}]*\} (\S+)$", body, re.M)
    return {name: float(value) for name, value in found}


async def measure(url: str, args: argparse.Namespace) -> dict:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    await one(client, model, "Hello!", 8)  # warm-up
    out: dict = {"single": {}, "texts": {}}
    for group, prompts in (("copying", COPYING), ("free", FREE)):
        before = counters(url)
        rates = []
        for name, prompt in prompts.items():
            tokens, seconds, text = await one(client, model, prompt, args.max_tokens)
            rates.append((tokens - 1) / seconds)
            out["texts"][name] = text
        after = counters(url)
        proposed = after.get("draft_tokens", 0) - before.get("draft_tokens", 0)
        kept = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
        out["single"][group] = {
            "tok_s": statistics.mean(rates),
            "acceptance": kept / proposed if proposed else None,
        }
    prompts = [*COPYING.values(), *FREE.values()]
    start = time.perf_counter()
    done = await asyncio.gather(
        *(one(client, model, prompts[i % len(prompts)], args.max_tokens) for i in range(args.streams))
    )
    out["streams_tok_s"] = sum(tokens for tokens, _, _ in done) / (time.perf_counter() - start)
    await client.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="GGUF (default: the demo model)")
    ap.add_argument("--llama-server", type=Path, metavar="PATH", help="also benchmark this llama-server")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--levante-args", default="", help="appended to both Levante servers' command lines")
    ap.add_argument("--threads", type=int, default=2, help="llama-server's -t")
    args = ap.parse_args()
    if args.model is None:
        from levante.loader import demo_model_path

        args.model = demo_model_path()
    levante = str(Path(sys.executable).with_name("levante"))
    targets = []
    for name, extra in (("levante", []), ("levante+spec", ["--speculative-config", SPEC])):
        port = free_port()
        cmd = [levante, "serve", "--model", str(args.model), "--port", str(port), "--no-web", *extra]
        targets.append((name, cmd + shlex.split(args.levante_args), f"http://127.0.0.1:{port}"))
    if args.llama_server:
        port = free_port()
        ctx = args.streams * (1024 + args.max_tokens)
        cmd = [str(args.llama_server), "-m", str(args.model), "-np", str(args.streams), "-c", str(ctx)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads)]
        targets.append(("llama-server", cmd, f"http://127.0.0.1:{port}"))
    results = {}
    for name, cmd, url in targets:
        with serving(cmd, url, Path(tempfile.gettempdir()) / f"levante-bench-{name}.log", 600):
            results[name] = asyncio.run(measure(url, args))
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "texts"}), flush=True)
    same = results["levante"]["texts"] == results["levante+spec"]["texts"]
    print(f"\nthe same greedy answers with and without speculation: {same}")
    print(f"{'single stream tok/s':<24}{'copying':>10}{'free':>10}{'acceptance (copying / free)':>30}")
    for name, r in results.items():
        s = r["single"]
        rates = " / ".join("-" if s[g]["acceptance"] is None else f"{s[g]['acceptance']:.0%}" for g in s)
        print(f"{name:<24}{s['copying']['tok_s']:>10.1f}{s['free']['tok_s']:>10.1f}{rates:>30}")
    base, spec = results["levante"]["single"], results["levante+spec"]["single"]
    for group in ("copying", "free"):
        line = f"speculation on / off, {group}: {spec[group]['tok_s'] / base[group]['tok_s']:.2f}x"
        if "llama-server" in results:
            peer = results["llama-server"]["single"][group]["tok_s"]
            line += f"; vs llama-server: {spec[group]['tok_s'] / peer:.2f}x"
        print(line)
    print(
        f"{args.streams} streams, output tok/s: off {results['levante']['streams_tok_s']:.1f}, "
        f"on {results['levante+spec']['streams_tok_s']:.1f} "
        f"({results['levante+spec']['streams_tok_s'] / results['levante']['streams_tok_s']:.2f}x)"
    )


if __name__ == "__main__":
    main()
