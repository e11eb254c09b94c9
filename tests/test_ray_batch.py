"""`levante batch --ray --replicas 2` on a real local Ray cluster: the same output as the
single-process job (both are checked line by line against the running server's answers)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from servers import ServerProcess
from test_batch import check_output, command, server_answers, write_job


def test_two_replicas_on_ray_data_give_the_single_process_output(
    tmp_path: Path, ray_cluster: str, demo: ServerProcess
) -> None:
    job, output = write_job(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    done = subprocess.run(
        command(job, output, "--ray", "--replicas", "2"), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "195 ok, 5 failed; 0 done before" in done.stderr
    check_output(output, server_answers(demo.url))
