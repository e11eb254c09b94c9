"""`levante batch --ray --replicas N`: one job split over N engine replicas with Ray Data.

`map_batches` with a callable class puts one engine (the server's app, as in a local job) in each
of N actors; each batch of lines runs concurrently on its actor's engine, and Ray keeps two
batches in flight per actor so the engine never idles between them. Results stream back to this
process as batches finish and go into the same resumable output as a local job: only lines not
yet written are sent, so a rerun resumes. Lines that are not requests never leave this process."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from levante.batch.jobs import BatchLine, Dispatcher, Job, record
from levante.errors import LevanteError

if TYPE_CHECKING:
    from levante.api.server import ServerConfig

REQUEST_FIELDS = [f.name for f in fields(BatchLine) if f.name != "error"]
"""What a request line is as a table row: scalars only (Ray Data's blocks are Arrow tables)."""


class Replica:
    """One engine in a Ray Data actor; a batch is a table of lines, its result a column of output
    lines (JSON text, since the bodies have no common schema)."""

    def __init__(self, config: ServerConfig) -> None:
        self.dispatcher = Dispatcher(config)

    async def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        names, columns = list(batch), [column.tolist() for column in batch.values()]
        lines = [BatchLine(**dict(zip(names, row, strict=True))) for row in zip(*columns, strict=True)]
        records = await asyncio.gather(*(self.dispatcher.run(line) for line in lines))
        return {"record": [json.dumps(r, ensure_ascii=False) for r in records]}


def run_on_ray(job: Job, config: ServerConfig, replicas: int) -> None:
    """Runs what is left of the job on the Ray cluster in RAY_ADDRESS (a new local one if unset)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise LevanteError("--ray needs Ray Data: pip install 'levante[ray]'") from None

    job.begin()
    for line in job.pending:
        if line.error is not None:
            job.write(record(line, error=line.error))
    requests = [
        {name: getattr(line, name) for name in REQUEST_FIELDS} for line in job.pending if line.error is None
    ]
    if not requests:
        return
    ray.init(logging_level=logging.WARNING, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # the job has its own
        per_batch = config.engine.max_num_seqs  # one engine batch per call, so a call keeps it full
        results = ray.data.from_items(requests, override_num_blocks=-(-len(requests) // per_batch))
        results = results.map_batches(
            Replica,
            fn_constructor_kwargs={"config": config},
            batch_size=per_batch,
            # two calls at once per replica: the next batch queues in the engine while the slowest
            # requests of the current one finish, so the engine does not idle at a batch's tail
            compute=ray.data.ActorPoolStrategy(
                size=replicas, max_tasks_in_flight_per_actor=2, max_concurrent_calls_per_actor=2
            ),
            num_gpus=1 if config.device.startswith("cuda") else 0,
        )
        for row in results.iter_rows():
            job.write(json.loads(row["record"]))
    except ray.exceptions.RayError as e:  # the replica's own error is the last line of Ray's message
        raise LevanteError(f"a replica failed: {str(e).strip().splitlines()[-1]}") from None
    finally:
        ray.shutdown()
