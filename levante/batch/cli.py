"""`levante batch INPUT.jsonl OUTPUT.jsonl`: an OpenAI Batch API file, run here or on Ray."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from levante.cli import engine_config, model_flags, positive, server_config
from levante.errors import LevanteError


def cmd_batch(args: argparse.Namespace) -> None:
    if args.replicas is not None and not args.ray:
        raise LevanteError("--replicas needs --ray")
    if args.ray and args.tensor_parallel_size > 1:
        raise LevanteError("--tensor-parallel-size shards one engine; with --ray, use --replicas")
    from levante.batch.jobs import Job

    job = Job(args.input, args.output)  # a bad input file fails here, before anything heavy loads
    try:
        engine = engine_config(args, max_num_seqs=args.max_num_seqs)
        # the job bounds what is in flight; a batch line never gets a 429
        config = server_config(args, engine, max_queue=sys.maxsize)
        if args.ray:
            from levante.distributed.ray_batch import run_on_ray

            run_on_ray(job, config, args.replicas or 1)
        else:
            from levante.batch.jobs import run_local

            run_local(job, config)
    finally:
        print(job.close(), file=sys.stderr)


def register(sub: Any) -> None:
    b = sub.add_parser(
        "batch",
        help="run an OpenAI Batch API file (JSONL) offline; rerun to resume",
        description="Each line's response body is what `levante serve` answers for the same request. "
        "Results are appended to OUTPUT as they finish; rerunning skips the custom_ids it already holds.",
    )
    b.add_argument("input", type=Path, help="requests: {custom_id, method, url, body} per line")
    b.add_argument("output", type=Path, help="results: {id, custom_id, response, error} per line")
    model_flags(b)
    b.add_argument("--served-model-name", help="the `model` the bodies may name (default: the model's name)")
    b.add_argument("--max-num-seqs", type=positive(int), default=64, help="sequences in one engine batch")
    b.add_argument(
        "--ray", action="store_true", help="split the job over replicas on the Ray cluster in RAY_ADDRESS"
    )
    b.add_argument("--replicas", type=positive(int), help="engine replicas with --ray (default 1)")
    b.set_defaults(func=cmd_batch)
