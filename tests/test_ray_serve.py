"""`levante serve --ray`: two engine replicas on a real local Ray cluster behind Serve's proxy,
driven by the official openai client; both take traffic, and SIGTERM leaves the cluster clean."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from servers import ServerProcess, health

from levante.api.server import ServerConfig
from levante.cli import main
from levante.distributed.ray_serve import REPLICA_HEADER, RayServeConfig, deployment
from levante.engine import EngineConfig


def _replica_metrics(url: str, want: int) -> dict[str, float]:
    """Finished sequences per replica, from each replica's own /metrics: Serve routes each scrape
    to some replica, so scrape until `want` replicas have answered."""
    finished: dict[str, float] = {}
    for _ in range(100):
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        (replica,) = re.findall(r'^levante:replica_info\{replica="(\w+)"\} 1\.0$', text, re.M)
        counts = re.findall(r"^levante:request_success_total\{.*\} (\S+)$", text, re.M)
        finished[replica] = sum(float(c) for c in counts)
        if len(finished) == want:
            return finished
    raise AssertionError(f"only replicas {sorted(finished)} answered /metrics")


def test_two_replicas_serve_the_openai_api(
    ray_cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "0")  # every replica's log lines reach the driver's log
    args = ["--ray", "--replicas", "2", "--ray-actor-options", json.dumps({"num_cpus": 0.5})]
    server = ServerProcess(
        [*args, "--kv-cache-memory", "0.25", "--max-model-len", "2048"], tmp_path / "serve.log"
    )
    try:
        server.wait_ready()
        deadline = time.monotonic() + 120  # /health answers once one replica is up; wait for both
        while "on Ray behind" not in server.log.read_text():
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log.read_text()[-3000:]
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        served: Counter[str] = Counter()  # sequences answered, by the replica named in the response

        def chat(content: str, **kw: Any) -> Any:
            raw = client.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": content}],
                max_tokens=8,
                temperature=0,
                **kw,
            )
            served[raw.headers[REPLICA_HEADER]] += 1
            return raw.parse()

        model = client.models.list().data[0].id
        answer = chat("Name a colour.")
        assert answer.choices[0].message.content and answer.usage.completion_tokens == 8
        stream = chat("Name a colour.", stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content  # greedy: the same answer from any replica
        assert chunks[-1].usage.completion_tokens == 8

        raw = client.completions.with_raw_response.create(
            model=model, prompt=["Once upon a", "The sea"], max_tokens=4
        )
        served[raw.headers[REPLICA_HEADER]] += 2
        assert [len(c.text) > 0 for c in raw.parse().choices] == [True, True]

        with ThreadPoolExecutor(4) as pool:  # concurrent load spreads over replicas (power of two choices)
            for _ in range(5):
                if len(served) == 2:
                    break
                list(pool.map(lambda i: chat(f"Count to {i}."), range(4)))
        assert len(served) == 2, served
        assert _replica_metrics(server.url, 2) == {name: float(n) for name, n in served.items()}
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]
    assert health(server.url) is None  # Serve (its proxy) shut down with the only app on it
    log = server.log.read_text()
    assert set(re.findall(r"levante\.distributed\.ray_serve \[(\w+)\]: replica ready", log)) == set(served)
    ray_status = [str(Path(sys.executable).parent / "ray"), "status", f"--address={ray_cluster}"]
    assert subprocess.run(ray_status, capture_output=True).returncode == 0  # the cluster itself lives on


def test_autoscaling_and_actor_options_reach_the_deployment() -> None:
    config = ServerConfig(device="cuda", engine=EngineConfig(max_num_seqs=16))
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    d = deployment(config, RayServeConfig(autoscaling=scaling, actor_options={"num_cpus": 4}))
    assert d.ray_actor_options == {"num_gpus": 1, "num_cpus": 4}
    assert d.max_ongoing_requests == 16
    auto = d._deployment_config.autoscaling_config  # Serve has no public getter for it
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 8)
    assert deployment(ServerConfig(), RayServeConfig(replicas=3)).num_replicas == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "2"], "--replicas, --ray-autoscaling and --ray-actor-options need --ray"),
        (["--ray", "--replicas", "2", "--ray-autoscaling", "{}"], "give --replicas or --ray-autoscaling"),
        (["--ray", "--ray-autoscaling", '{"min_replicas": 3, "max_replicas": 1}'], "--ray-autoscaling: "),
        (["--ray", "--ray-autoscaling", '{"max_replica": 2}'], "--ray-autoscaling: "),
        (["--ray", "--ray-actor-options", '{"num_cpus": -1}'], "--ray-actor-options: "),
    ],
)
def test_bad_ray_flags_are_refused_before_any_cluster(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens: reaching it would fail otherwise
    assert main(["serve", *argv]) == 1
    assert message in capsys.readouterr().err


def test_ray_flags_must_be_json_objects(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--ray", "--ray-autoscaling", "[1, 2]"])
    assert stopped.value.code == 2
    assert "argument --ray-autoscaling: must be a JSON object" in capsys.readouterr().err
