"""Metering end to end: keys made by the `levante keys` CLI, a real `levante serve` writing a real
SQLite ledger, driven by the official `openai` client — usage equals what clients saw, budgets
hold across restarts, and a SIGKILL loses or doubles no finished request."""

from __future__ import annotations

import hmac
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from servers import ServerProcess, post, running

from levante.errors import LevanteError
from levante.metering import ledger as ledger_module
from levante.metering.ledger import Ledger
from levante.metering.prices import Prices

SERVE = ["--kv-cache-memory", "0.25", "--max-model-len", "2048", "--served-model-name", "m"]
SERVE += ["--price-cached-input", "0.02", "--no-web"]
PRICES = Prices(cached_input=0.02)


def levante(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LEVANTE_USAGE_DB": str(db)}
    return subprocess.run(
        [sys.executable, "-m", "levante.cli", *args], capture_output=True, text=True, env=env, timeout=60
    )


def new_key(db: Path, team: str, name: str, *extra: str) -> str:
    done = levante(db, "keys", "create", "--team", team, "--name", name, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def rows(db: Path, where: str = "1", args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(f"SELECT * FROM requests WHERE {where}", args).fetchall()


def wait_rows(db: Path, count: int, where: str = "1", args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Aborted requests are settled when the server notices the client left: wait for them."""
    deadline = time.monotonic() + 30
    while len(found := rows(db, where, args)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def _seen(response: Any, choices: list[Any]) -> dict[str, Any]:
    """The id, usage and every choice's finish reason, as the client got them."""
    reasons = {c.finish_reason for c in choices if c.finish_reason is not None}
    return {"id": response.id, "usage": response.model_dump()["usage"], "reasons": reasons}


def _streamed(chunks: list[Any]) -> dict[str, Any]:
    return {**_seen(chunks[-1], [c for chunk in chunks for c in chunk.choices]), "id": chunks[0].id}


def one_request(c: openai.OpenAI, kind: int) -> dict[str, Any]:
    """One of five request shapes; returns the id, usage (None when aborted) and finish reasons the
    client saw."""
    if kind == 0:
        r = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6)
        return _seen(r, r.choices)
    if kind == 1:
        stream = c.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        return _streamed(list(stream))
    if kind == 2:  # two prompts: one may stop while the other runs out of tokens
        r = c.completions.create(model="m", prompt=["Red, green,", "One, two,"], max_tokens=5)
        return _seen(r, r.choices)
    if kind == 3:
        stream = c.completions.create(
            model="m", prompt="A, B,", max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
        return _streamed(list(stream))
    stream = c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=400, stream=True)
    for seen, chunk in enumerate(stream, 1):
        if seen == 3:
            stream.close()  # the client walks away mid-answer
            return {"id": chunk.id, "usage": None}
    raise AssertionError("the stream ended before the client could abort it")


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    base = tmp_path_factory.mktemp("metered")
    db = base / "usage.db"
    Ledger(db).close()
    new_key(db, "seed", "seed")  # keys exist before the server starts, so it asks for them
    with running([*SERVE, "--usage-db", str(db)], base / "server.log") as server:
        yield server, db


def test_ledger_equals_the_usage_clients_saw(metered: tuple[ServerProcess, Path]) -> None:
    server, db = metered
    key = new_key(db, "research", "alice")  # made while the server runs: it must pick it up
    c = client(server, key)
    kinds = [0] * 15 + [1] * 12 + [2] * 8 + [3] * 10 + [4] * 5
    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda k: one_request(c, k), kinds))
    ledger = {r["id"]: r for r in wait_rows(db, 50, "key_name = 'alice'")}
    assert len(ledger) == 50 and set(ledger) == {s["id"] for s in seen}
    done = [s for s in seen if s["usage"] is not None]
    assert len(done) == 45
    for field in ("prompt_tokens", "completion_tokens", "cost"):
        ours = sum(ledger[s["id"]][field] for s in done)
        assert ours == pytest.approx(sum(s["usage"][field] for s in done), rel=1e-12)
    cached = sum(s["usage"]["prompt_tokens_details"]["cached_tokens"] for s in done)
    assert cached > 0 and cached == sum(ledger[s["id"]]["cached_tokens"] for s in done)
    for s in done:
        u = s["usage"]
        assert u["cost"] == pytest.approx(
            PRICES.cost(
                u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"], u["completion_tokens"]
            )
        )
        # a request with several choices keeps each distinct reason, sorted and comma-joined
        assert s["reasons"] and ledger[s["id"]]["finish_reason"] == ",".join(sorted(s["reasons"]))
        assert ledger[s["id"]]["team"] == "research" and ledger[s["id"]]["latency"] > 0
    for s in seen:
        if s["usage"] is None:  # aborted: billed for what was generated, marked as aborted
            row = ledger[s["id"]]
            assert row["finish_reason"] == "abort" and 2 <= row["completion_tokens"] < 400
            assert row["prompt_tokens"] > 0


def test_keys_are_checked(metered: tuple[ServerProcess, Path]) -> None:
    server, db = metered
    key = new_key(db, "ops", "bob")
    assert client(server, key).models.list().data
    for bad in (key[:-1] + ("x" if key[-1] != "x" else "y"), "lv-unknown"):
        with pytest.raises(openai.AuthenticationError) as e:
            client(server, bad).models.list()
        assert "Incorrect API key" in e.value.message
    status, body = post(server.url, "/v1/chat/completions", {"messages": MESSAGES})  # no header at all
    assert status == 401 and "didn't provide an API key" in body["error"]["message"]
    for path in ("/", "/web/api/spaces"):  # --no-web: the API only
        assert post(server.url, path, {}, {"Authorization": f"Bearer {key}"})[0] == 404
    bob = next(k for k in Ledger(db).list_keys("ops") if k.name == "bob")
    done = levante(db, "keys", "revoke", str(bob.id))
    assert done.returncode == 0, done.stderr
    with pytest.raises(openai.AuthenticationError) as e:
        client(server, key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert "revoked" in e.value.message


def test_revoking_every_key_does_not_open_the_server(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "u.db")
    assert not ledger.has_keys()  # a fresh ledger: an open server, as without --usage-db
    key, secret = ledger.create_key("t", "only")
    ledger.revoke(key.id or 0)
    found = ledger.authenticate(secret)
    assert ledger.has_keys() and found is not None and found.revoked is not None


def test_key_checks_compare_every_digest_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timings: the check hashes what it is given and runs hmac.compare_digest against every
    stored digest, so nothing depends on how many leading characters of a key were right."""
    ledger = Ledger(tmp_path / "u.db")
    secrets = [ledger.create_key("t", f"k{i}")[1] for i in range(3)]
    calls: list[tuple[str, str]] = []
    compare = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(ledger_module.hmac, "compare_digest", spy)
    right = secrets[1]
    tries = [right, right[:-1] + "#", "#" + right[1:], right[:10], "x"]
    for presented in tries:
        calls.clear()
        found = ledger.authenticate(presented)
        assert (found is not None) == (presented == right)
        assert len(calls) == 3  # every stored key, even after a match
        assert all(len(a) == len(b) == 64 for a, b in calls)  # digests, never the raw key
        assert all(b == ledger_module.digest(presented) for _, b in calls)


def test_team_budget_runs_out_in_flight_finishes_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    first, second = new_key(db, "lab", "first"), new_key(db, "lab", "second")
    assert levante(db, "keys", "set-budget", "--team", "lab", "0.00002").returncode == 0
    server = ServerProcess([*SERVE, "--usage-db", str(db)], tmp_path / "server.log")
    try:
        server.wait_ready()
        long = client(server, first).chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=60, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(long)]  # admitted and running before the budget runs out
        c = client(server, second)
        answered = 0
        with pytest.raises(openai.RateLimitError) as refused:
            for _ in range(20):
                c.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6)
                answered += 1
        assert answered >= 2
        error = refused.value.body
        assert error["type"] == "insufficient_quota" and error["code"] == "budget_exceeded"
        assert "team 'lab'" in error["message"]
        chunks += list(long)  # the request in flight is not cut off
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 30
        spent = sum(r["cost"] for r in rows(db, "team = 'lab'"))
        assert spent >= 0.00002 and len(rows(db, "team = 'lab'")) == answered + 1
    finally:
        server.stop()
    with running([*SERVE, "--usage-db", str(db)], tmp_path / "again.log") as again:
        assert sum(r["cost"] for r in rows(db, "team = 'lab'")) == spent  # the ledger kept it
        with pytest.raises(openai.RateLimitError) as still:
            client(again, first).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert "team 'lab'" in still.value.body["message"]
        assert levante(db, "keys", "set-budget", "--team", "lab", "none").returncode == 0
        r = client(again, first).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert r.usage is not None and r.usage.completion_tokens > 0


def test_key_budget(metered: tuple[ServerProcess, Path]) -> None:
    server, db = metered
    key = new_key(db, "misc", "capped", "--monthly-budget", "0")
    with pytest.raises(openai.RateLimitError) as e:
        client(server, key).chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
    assert "key 'capped'" in e.value.body["message"]


def test_sigkill_loses_and_doubles_nothing(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    key = new_key(db, "load", "k")
    server = ServerProcess([*SERVE, "--usage-db", str(db)], tmp_path / "server.log")
    server.wait_ready()
    c = client(server, key)
    succeeded: list[str] = []
    stop = threading.Event()

    def traffic(kind: int) -> None:
        while not stop.is_set():
            try:
                succeeded.append(one_request(c, kind)["id"])
            except (openai.APIError, AssertionError, IndexError):
                return  # the server died under this request
            except Exception:
                return

    threads = [threading.Thread(target=traffic, args=(k,)) for k in (0, 1, 2, 3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(succeeded) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.proc.kill()
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=60)
    ids = [r["id"] for r in rows(db)]
    assert len(succeeded) >= 12
    assert len(ids) == len(set(ids))  # recorded at most once
    assert set(succeeded) <= set(ids)  # every answer a client got is in the ledger
    assert len(ids) - len(succeeded) <= len(threads)  # at most the ones cut off in flight


def test_usage_reports(metered: tuple[ServerProcess, Path]) -> None:
    server, db = metered
    admin = new_key(db, "ops", "root", "--admin")
    user = new_key(db, "report", "carol")
    for _ in range(2):
        client(server, user).chat.completions.create(model="m", messages=MESSAGES, max_tokens=3)
    team = [r for r in rows(db, "team = 'report'")]
    http = client(server, admin).get("/usage", cast_to=object, options={"params": {"team": "report"}})
    (row,) = http["data"]
    assert row["team"] == "report" and row["key"] == "carol" and row["requests"] == 2
    assert row["completion_tokens"] == sum(r["completion_tokens"] for r in team)
    assert row["cost"] == pytest.approx(sum(r["cost"] for r in team))
    assert row["p50_latency"] > 0 and row["tokens_per_second"] > 0
    with pytest.raises(openai.PermissionDeniedError):
        client(server, user).get("/usage", cast_to=object)
    with pytest.raises(openai.BadRequestError) as e:
        client(server, admin).get("/usage", cast_to=object, options={"params": {"since": "yesterday"}})
    assert e.value.body["param"] == "since"
    as_json = levante(db, "usage", "--team", "report", "--format", "json", "--group", "team")
    assert as_json.returncode == 0, as_json.stderr
    (total,) = json.loads(as_json.stdout)
    assert total["team"] == "report" and total["requests"] == 2
    as_csv = levante(db, "usage", "--format", "csv", "--since", "2000-01-01").stdout.splitlines()
    assert as_csv[0].startswith("day,team,key,requests") and any(",report,carol,2," in x for x in as_csv)
    assert "carol" in levante(db, "usage").stdout
    assert "nothing" in levante(db, "usage", "--since", "2999-01-01").stdout


CALCULATE = [
    "cost",
    "--seats",
    "5",
    "--messages-per-day",
    "80",
    "--input-tokens",
    "1500",
    "--output-tokens",
    "300",
]


def test_cost_calculator_matches_hand_calculation(tmp_path: Path) -> None:
    done = levante(tmp_path / "unused.db", *CALCULATE, "--compare", "big=2.5/10")
    assert done.returncode == 0, done.stderr
    # 5 × 80 × 30 = 12,000 messages; 18M input and 3.6M output tokens a month;
    # at $0.10 / $0.30 per million: 1.80 + 1.08 = $2.88; at $2.50 / $10: 45 + 36 = $81.00
    ours = next(line for line in done.stdout.splitlines() if line.startswith("levante"))
    big = next(line for line in done.stdout.splitlines() if line.startswith("big"))
    assert "12,000" in ours and "18,000,000" in ours and "3,600,000" in ours and ours.endswith("$2.88")
    assert big.endswith("$81.00")
    week = levante(tmp_path / "unused.db", *CALCULATE, "--days", "7", "--price-input", "0.2")
    # 2,800 messages: 4.2M × $0.20 + 0.84M × $0.30 = 0.84 + 0.252 = $1.09
    assert week.stdout.strip().endswith("$1.09"), week.stdout


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["keys", "create", "--team", "t", "--name", "dup"], "already has a key named 'dup'"),
        (["keys", "set-budget", "--team", "nobody", "5"], "no team named 'nobody'"),
        (["keys", "revoke", "999"], "no key with id 999"),
        (["keys", "set-budget", "--team", "t", "-1"], "must be >= 0"),
        (["usage", "--since", "last week"], "--since: expected a date"),
        (["usage", "--group", "hour"], "group by any of day, team, key"),
        ([*CALCULATE, "--compare", "x=1"], "expected NAME=IN/OUT"),
    ],
)
def test_cli_bad_input_is_named(tmp_path: Path, args: list[str], complaint: str) -> None:
    db = tmp_path / "u.db"
    new_key(db, "t", "dup")
    done = levante(db, *args)
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


def test_no_ledger_configured_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LEVANTE_USAGE_DB"}
    done = subprocess.run(
        [sys.executable, "-m", "levante.cli", "keys", "list"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and "--usage-db" in done.stderr


def test_prices() -> None:
    p = Prices(input=0.10, output=0.30, cached_input=0.02)
    # 1000 prompt tokens of which 400 cached, 200 out: (600×0.10 + 400×0.02 + 200×0.30) / 1e6
    assert p.cost(1000, 400, 200) == pytest.approx((60 + 8 + 60) / 1e6)
    assert Prices().cost(1000, 400, 200) == pytest.approx((100 + 60) / 1e6)  # cached priced as input
    with pytest.raises(LevanteError, match="cached_input"):
        Prices(cached_input=-1)
