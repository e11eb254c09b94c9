"""The Spaces web app in a real headless Chromium (Debian's, driven by Playwright) against a real
`levante serve` on loopback: members of one team sign in with their keys, share a Space, see the
model's answer stream in, keep a memory; another team sees nothing; the pool running out refuses
the mention; hostile text renders as text; a restart loses nothing. The JSON API's bad inputs are
checked over plain HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Route, expect
from servers import ServerProcess
from test_metering import levante, new_key

from levante.api.responses_api import to_messages
from levante.web.answers import Answers, forced_tool, mentions, thread_items
from levante.web.events import Hub
from levante.web.store import Store

MODEL = "smollm2"
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


@dataclass
class Team:
    """A metered server with two teams: acme (ana, ben) and other (zed)."""

    server: ServerProcess
    args: list[str]
    db: Path
    spaces: Path
    keys: dict[str, str]

    def restart(self, log: Path) -> None:
        """Stops the server and starts a new one on the same port and files."""
        port = self.server.port
        assert self.server.stop() == 0
        self.server = ServerProcess(self.args, log, port=port)
        self.server.wait_ready()


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    home = tmp_path_factory.mktemp("web")
    db, spaces = home / "usage.db", home / "spaces.db"
    keys = {name: new_key(db, t, name) for t, name in (("acme", "ana"), ("acme", "ben"), ("other", "zed"))}
    args = ["--kv-cache-memory", "0.25", "--max-model-len", "2048", "--served-model-name", MODEL]
    args += ["--usage-db", str(db), "--spaces-db", str(spaces), "--log-prompts", "--space-max-tokens", "48"]
    holder = Team(ServerProcess(args, home / "server.log"), args, db, spaces, keys)
    try:
        holder.server.wait_ready()
        yield holder
    finally:
        holder.server.stop()


def api(url: str, path: str, key: str, body: Any = None, method: str | None = None) -> tuple[int, Any]:
    """The web API with a bearer key, as a script would call it."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{url}{path}", data, method=method or ("POST" if data else "GET"))
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw and "json" in resp.headers.get(
                "content-type", ""
            ) else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Member:
    """One person in their own browser context, with every console error collected."""

    def __init__(self, browser: Browser, url: str, width: int = 1280, height: int = 800) -> None:
        self.url = url
        self.context: BrowserContext = browser.new_context(viewport={"width": width, "height": height})
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        """Script errors fail the test; the browser's note of a 4xx the test provoked does not."""
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.errors.append(message.text)

    def sign_in(self, key: str) -> Member:
        self.page.goto(f"{self.url}/")
        self.page.fill("[data-testid=api-key]", key)
        self.page.click("[data-testid=sign-in]")
        expect(self.page.locator("[data-testid=sign-out]")).to_be_visible()
        return self

    def open(self, space: str) -> None:
        self.page.goto(f"{self.url}/spaces/{space}")
        expect(self.page.locator("[data-testid=connection]")).to_have_attribute("data-state", "open")

    def messages(self, role: str | None = None) -> Any:
        selector = "[data-testid=message]" + (f"[data-role={role}]" if role else "")
        return self.page.locator(selector)

    def send(self, text: str) -> None:
        composer = self.page.locator("[data-testid=composer]")
        composer.fill(text)
        self.page.click("[data-testid=send]")

    def csrf(self) -> str:
        return self.page.evaluate("fetch('/web/api/me').then(r => r.json()).then(me => me.csrf)")

    def close(self) -> None:
        assert self.errors == [], self.errors
        self.context.close()


def new_space(member: Member, title: str) -> str:
    before = member.page.url
    member.page.fill("[data-testid=new-space-title]", title)
    member.page.click("[data-testid=new-space]")
    member.page.wait_for_url(lambda url: "/spaces/" in url and url != before)  # not the Space open before
    expect(member.page.locator("[data-testid=connection]")).to_have_attribute("data-state", "open")
    return member.page.url.rsplit("/", 1)[1]


def watch_answers(page: Page) -> None:
    """Records every (status, text) an answer shows, to tell a streamed answer from one that
    appeared whole."""
    page.evaluate(
        """() => {
        window.__seen = [];
        const record = () => document.querySelectorAll('[data-testid=message][data-role=assistant]')
            .forEach(m => window.__seen.push([m.dataset.id, m.dataset.status,
                m.querySelector('[data-testid=message-body]').textContent]));
        new MutationObserver(record).observe(document.body,
            {subtree: true, childList: true, characterData: true, attributes: true});
    }"""
    )


def ledger_rows(db: Path) -> list[sqlite3.Row]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute("SELECT * FROM requests WHERE endpoint = 'space' ORDER BY time").fetchall()


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


# ---- a team working together -----------------------------------------------------------------


def test_two_members_share_a_space_and_the_answer_streams_to_both(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana, ben = Member(browser, url).sign_in(team.keys["ana"]), Member(browser, url).sign_in(team.keys["ben"])
    space = new_space(ana, "Launch plan")
    ben.page.reload()
    expect(ben.page.locator("[data-testid=space-link]", has_text="Launch plan")).to_be_visible()
    ben.open(space)
    watch_answers(ben.page)

    composer = ana.page.locator("[data-testid=composer]")
    composer.press_sequentially("@smo")
    expect(ana.page.locator("[data-testid=mention-option]", has_text=MODEL)).to_be_visible()
    composer.press("Tab")
    assert composer.input_value() == f"@{MODEL} "
    composer.press_sequentially("what should we call the launch?")
    composer.press("Enter")

    for member in (ana, ben):
        expect(member.messages("user")).to_have_count(1)
        expect(member.messages("user").first).to_contain_text("what should we call the launch?")
        expect(member.messages("user").first.locator("[data-testid=message-author]")).to_have_text("ana")
        answer = member.messages("assistant").first
        expect(answer).to_have_attribute("data-status", "done", timeout=60_000)
        expect(answer.locator("[data-testid=message-meta]")).to_contain_text("ana")
    seen = ben.page.evaluate("window.__seen")
    streamed = {text for _, status, text in seen if status == "streaming" and text.strip()}
    assert len(streamed) >= 2, f"ben's page never showed the answer growing: {seen[-5:]}"

    rows = ledger_rows(team.db)
    assert len(rows) == 1 and rows[0]["key_name"] == "ana" and rows[0]["team"] == "acme"
    status, body = api(url, f"/web/api/spaces/{space}", team.keys["ben"])
    assert status == 200
    answer = body["messages"][1]
    assert answer["usage"]["cost"] == pytest.approx(rows[0]["cost"])  # the answer shows what was billed
    assert body["credits"]["space_spent"] == pytest.approx(rows[0]["cost"])
    expect(ben.page.locator("[data-testid=space-spent]")).to_contain_text("$0.0")
    ana.close()
    ben.close()


def test_memory_notes_reach_the_model(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana = Member(browser, url).sign_in(team.keys["ana"])
    space = new_space(ana, "Memory")
    ana.send(f"@{MODEL} what is our product called?")
    expect(ana.messages("assistant").first).to_have_attribute("data-status", "done", timeout=60_000)

    note = "Our product is called Levante and ships on March 3."
    ana.page.fill("[data-testid=note-input]", note)
    ana.page.click("[data-testid=add-note]")
    expect(ana.page.locator("[data-testid=note]")).to_contain_text(note)
    ana.send(f"@{MODEL} what is our product called?")
    expect(ana.messages("assistant").nth(1)).to_have_attribute("data-status", "done", timeout=60_000)

    log = team.server.log.read_text()
    prompts = [line for line in log.splitlines() if "what is our product called" in line]
    assert note not in prompts[-2] and note in prompts[-1]  # --log-prompts shows what the model read

    # edit and delete are shared too
    ana.page.click("[data-testid=edit-note]")
    ana.page.locator("[data-testid=note] textarea").fill("Ships on March 4.")
    ana.page.click("[data-testid=save-note]")
    expect(ana.page.locator("[data-testid=note]")).to_contain_text("Ships on March 4.")
    status, body = api(url, f"/web/api/spaces/{space}", team.keys["ben"])
    assert status == 200
    assert [n["text"] for n in body["notes"]] == ["Ships on March 4."]
    ana.page.click("[data-testid=delete-note]")
    expect(ana.page.locator("[data-testid=note]")).to_have_count(0)
    ana.close()


def test_stop_regenerate_and_proposed_notes(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana, ben = Member(browser, url).sign_in(team.keys["ana"]), Member(browser, url).sign_in(team.keys["ben"])
    space = new_space(ana, "Stop")
    ben.open(space)
    before = len(ledger_rows(team.db))
    ana.send(f"@{MODEL} tell me a long story about the sea")
    # once it is writing: a stop before the engine request began would leave nothing to bill
    body = ana.messages("assistant").first.locator("[data-testid=message-body]")
    expect(body).to_have_text(re.compile(r"\S"))
    ana.page.click("[data-testid=stop]")
    for member in (ana, ben):
        expect(member.messages("assistant").first).to_have_attribute("data-status", "stopped")
    rows = ledger_rows(team.db)
    assert len(rows) == before + 1 and rows[-1]["finish_reason"] == "abort"  # billed for what it wrote

    ben.messages("assistant").first.locator("[data-testid=regenerate]").click()
    for member in (ana, ben):
        answer = member.messages("assistant").first
        expect(answer).to_have_attribute("data-status", "done", timeout=60_000)
        expect(answer.locator("[data-testid=message-meta]")).to_contain_text("ben")  # who asked again
    assert len(ledger_rows(team.db)) == before + 2
    assert api(url, f"/web/api/spaces/{space}", team.keys["ana"])[1]["credits"][
        "space_spent"
    ] == pytest.approx(
        sum(r["cost"] for r in ledger_rows(team.db)[before:])
    )  # a regenerated answer's first run stays billed to the Space

    # a note the model proposed (its `remember` tool, offered where the model has a tool format)
    store = Store(team.spaces)
    store.add_note(space, "The team likes sea stories.", MODEL, "proposed")
    store.close()
    ben.page.reload()
    proposed = ben.page.locator("[data-testid=note][data-status=proposed]")
    expect(proposed).to_contain_text("The team likes sea stories.")
    proposed.locator("[data-testid=confirm-note]").click()
    expect(ana.page.locator("[data-testid=note][data-status=pinned]")).to_contain_text("sea stories")
    ana.close()
    ben.close()


def test_hostile_text_renders_as_text(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana, ben = Member(browser, url).sign_in(team.keys["ana"]), Member(browser, url).sign_in(team.keys["ben"])
    space = new_space(ana, "XSS")
    ben.open(space)
    ana.send(f"look: {XSS} and **bold**")
    for member in (ana, ben):
        body = member.messages("user").first.locator("[data-testid=message-body]")
        expect(body).to_contain_text('<img src=x onerror="window.__xss=1">')
        expect(body.locator("strong")).to_have_text("bold")  # markdown still renders
        assert body.locator("img, script").count() == 0
    # a model answer goes through the same renderer: one carrying the payload, written to the store
    store = Store(team.spaces)
    store.update_answer(
        store.post(space, "ana", f"@{MODEL} repeat it", [], {"model": MODEL})[1]["id"],
        content=f"Here it is: {XSS}",
        status="done",
    )
    store.close()
    ben.page.reload()
    answer = ben.messages("assistant").first.locator("[data-testid=message-body]")
    expect(answer).to_contain_text("<script>window.__xss=2</script>")
    for member in (ana, ben):
        assert member.page.evaluate("window.__xss") is None
    ana.close()
    ben.close()


def test_csrf_and_the_session_cookie(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana = Member(browser, url).sign_in(team.keys["ana"])
    cookie = next(c for c in ana.context.cookies() if c["name"] == "levante_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert ana.page.evaluate("document.cookie") == ""  # out of the page's reach
    post = """([token]) => fetch('/web/api/spaces', {method: 'POST',
        headers: Object.assign({'Content-Type': 'application/json'}, token ? {'X-CSRF-Token': token} : {}),
        body: JSON.stringify({title: 'forged'})}).then(async r => [r.status, await r.json()])"""
    status, body = ana.page.evaluate(post, [None])
    assert status == 403 and body["error"]["code"] == "csrf"
    status, body = ana.page.evaluate(post, ["wrong"])
    assert status == 403
    status, body = ana.page.evaluate(post, [ana.csrf()])
    assert status == 201 and body["title"] == "forged"
    ana.page.click("[data-testid=sign-out]")
    expect(ana.page.locator("[data-testid=api-key]")).to_be_visible()
    status, _ = ana.page.evaluate("fetch('/web/api/spaces').then(async r => [r.status, await r.json()])")
    assert status == 401
    ana.close()


def test_another_team_sees_nothing(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana = team.keys["ana"]
    status, space = api(url, "/web/api/spaces", ana, {"title": "Acme only"})
    assert status == 201
    sid = space["id"]
    status, _ = api(url, f"/web/api/spaces/{sid}/messages", ana, {"content": "secret", "images": []})
    assert status == 201
    zed = Member(browser, url).sign_in(team.keys["zed"])
    response = zed.page.goto(f"{url}/spaces/{sid}")
    assert response is not None and response.status == 404
    expect(zed.page.locator("body")).not_to_contain_text("secret")
    expect(zed.page.locator("[data-testid=space-link]", has_text="Acme only")).to_have_count(0)
    zed_key = team.keys["zed"]
    for path in ("", "/events", "/export.json", "/export.md"):
        status, body = api(url, f"/web/api/spaces/{sid}{path}", zed_key)
        assert status == 404 and body["error"]["code"] == "not_found", path
    status, _ = api(url, f"/web/api/spaces/{sid}/messages", zed_key, {"content": "hi"})
    assert status == 404
    status, _ = api(url, f"/web/api/spaces/{sid}/notes", zed_key, {"text": "mine now"})
    assert status == 404
    assert all(s["id"] != sid for s in api(url, "/web/api/spaces", zed_key)[1]["data"])
    zed.close()


def test_spent_pool_refuses_the_mention_and_writes_nothing(team: Team, browser: Browser) -> None:
    url = team.server.url
    ana = Member(browser, url).sign_in(team.keys["ana"])
    space = new_space(ana, "Budget")
    ana.send("before the limit")
    expect(ana.messages("user")).to_have_count(1)
    assert levante(team.db, "keys", "set-budget", "--team", "acme", "0").returncode == 0
    try:
        ana.send(f"@{MODEL} one more answer please")
        error = ana.page.locator("[data-testid=composer-error]")
        expect(error).to_contain_text("Budget exceeded: team 'acme' has spent its monthly budget")
        expect(ana.page.locator("[data-testid=composer]")).to_have_value(f"@{MODEL} one more answer please")
        status, body = api(url, f"/web/api/spaces/{space}", team.keys["ben"])
        assert status == 200
        assert [m["content"] for m in body["messages"]] == ["before the limit"]  # nothing half-written
        assert body["credits"]["monthly_budget"] == 0
        ana.send("a plain message still posts")
        expect(ana.messages("user")).to_have_count(2)
    finally:
        assert levante(team.db, "keys", "set-budget", "--team", "acme", "none").returncode == 0
    ana.close()


def test_bad_input_is_named(team: Team) -> None:
    url, ana = team.server.url, team.keys["ana"]
    sid = api(url, "/web/api/spaces", ana, {"title": "Inputs"})[1]["id"]
    cases = [
        ("/web/api/spaces", {"title": ""}, "title"),
        ("/web/api/spaces", {"title": "x", "colour": "red"}, "colour"),
        ("/web/api/spaces", {"title": "x", "team": "other"}, "team"),
        (f"/web/api/spaces/{sid}/messages", {"content": "   "}, "content"),
        (
            f"/web/api/spaces/{sid}/messages",
            {"content": "x", "images": ["data:image/png;base64,@@"]},
            "images[0]",
        ),
        (
            f"/web/api/spaces/{sid}/messages",
            {"content": "x", "images": ["http://169.254.169.254/"]},
            "images[0]",
        ),
        (f"/web/api/spaces/{sid}/notes", {"text": ""}, "text"),
        (f"/web/api/spaces/{sid}/messages/999999/regenerate", {}, None),
    ]
    for path, body, param in cases:
        status, err = api(url, path, ana, body)
        assert 400 <= status < 500 and err["error"]["param"] == param, (path, body, status, err)
    edits = [({"enable": ["nowhere"]}, "enable[0]"), ({"title": "  "}, "title"), ({"mcp": ["x"]}, "mcp")]
    for body, param in edits:
        status, err = api(url, f"/web/api/spaces/{sid}", ana, body, "PATCH")
        assert status == 400 and err["error"]["param"] == param, (body, status, err)
    assert (
        "configured: none"
        in api(url, f"/web/api/spaces/{sid}", ana, {"enable": ["x"]}, "PATCH")[1]["error"]["message"]
    )
    assert api(url, f"/web/api/spaces/{sid}", team.keys["zed"], {"title": "mine"}, "PATCH")[0] == 404
    status, renamed = api(url, f"/web/api/spaces/{sid}", ana, {"title": " Inputs, renamed "}, "PATCH")
    assert status == 200 and renamed["title"] == "Inputs, renamed" and renamed["mcp"] == []
    status, err = api(
        url, "/web/api/cost?seats=0&messages_per_day=80&input_tokens=500&output_tokens=300", ana
    )
    assert status == 400 and err["error"]["param"] == "seats"
    status, err = api(
        url, "/web/api/cost?seats=5&messages_per_day=80&input_tokens=500&output_tokens=300", ana
    )
    assert status == 200 and err["messages"] == 5 * 80 * 30
    status, err = api(url, "/web/api/spaces", "lv-wrong")
    assert status == 401


def test_one_server_per_spaces_file(team: Team, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "levante.cli", "serve", "--port", "1", "--spaces-db", str(team.spaces)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "is in use by another levante serve" in done.stderr, done.stderr


def test_export(team: Team) -> None:
    url, ana = team.server.url, team.keys["ana"]
    sid = api(url, "/web/api/spaces", ana, {"title": "Export me"})[1]["id"]
    image = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
    assert (
        api(url, f"/web/api/spaces/{sid}/messages", ana, {"content": "see *this*", "images": [image]})[0]
        == 201
    )
    assert api(url, f"/web/api/spaces/{sid}/notes", ana, {"text": "Remember the alamo"})[0] == 201
    status, data = api(url, f"/web/api/spaces/{sid}/export.json", ana)
    assert status == 200 and data["space"]["title"] == "Export me"
    assert data["messages"][0]["content"] == "see *this*" and data["notes"][0]["text"] == "Remember the alamo"
    assert base64.b64decode(data["images"][data["messages"][0]["images"][0]].split(",")[1]) == png(8, 8)
    status, text = api(url, f"/web/api/spaces/{sid}/export.md", ana)
    text = text.decode()
    assert text.startswith("# Export me") and "- Remember the alamo" in text and "see *this*" in text


def test_model_page_calculator_and_status(team: Team, browser: Browser) -> None:
    ana = Member(browser, team.server.url).sign_in(team.keys["ana"])
    ana.page.click("[data-testid=nav-model]")
    expect(ana.page.locator("[data-testid=model-name]")).to_have_text(MODEL)
    expect(ana.page.locator("[data-testid=starter]")).to_have_count(5)
    ana.page.fill("[data-testid=calc-seats]", "5")
    ana.page.fill("[data-testid=calc-messages]", "80")
    ana.page.fill("[data-testid=calc-input-tokens]", "1000")
    ana.page.fill("[data-testid=calc-output-tokens]", "500")
    usage = ["--seats", "5", "--messages-per-day", "80", "--input-tokens", "1000", "--output-tokens", "500"]
    done = levante(team.db, "cost", *usage)
    assert done.returncode == 0, done.stderr
    printed = re.search(r"^levante\b.*\$([\d,.]+)\s*$", done.stdout, re.M)
    assert printed is not None, done.stdout
    expect(ana.page.locator("[data-testid=calc-cost]")).to_have_text(f"${printed[1]}")  # the same math
    assert float(ana.page.locator("[data-testid=calc-cost]").get_attribute("data-usd") or 0) == pytest.approx(
        3.0
    )
    table = ana.page.locator("[data-testid=status-table]")
    expect(table).to_contain_text("%")  # uptime measured from the server's own heartbeat
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api(team.server.url, "/v1/chat/completions", team.keys["ben"], chat)[0] == 200
    status = api(team.server.url, "/web/api/model", team.keys["ana"])[1]["status"]
    assert status["requests"] >= 1 and status["p50_latency"] > 0 and status["throughput"] > 0
    assert 0 < status["uptime"] <= 1

    ana.page.locator("[data-testid=open-in-space]").nth(1).click()
    new_space(ana, "Support")
    composer = ana.page.locator("[data-testid=composer]")
    expect(composer).to_have_value(re.compile(f"^@{MODEL} Read this entire support ticket thread"))
    ana.close()


def test_a_restart_loses_nothing_and_pages_reconnect(team: Team, browser: Browser, tmp_path: Path) -> None:
    url = team.server.url
    ana, ben = Member(browser, url).sign_in(team.keys["ana"]), Member(browser, url).sign_in(team.keys["ben"])
    space = new_space(ana, "Restart")
    ben.open(space)
    ana.send("before the restart")
    expect(ben.messages("user")).to_have_count(1)
    team.restart(tmp_path / "restarted.log")
    for member in (ana, ben):
        expect(member.page.locator("[data-testid=connection]")).to_have_attribute(
            "data-state", "open", timeout=30_000
        )
    ana.send("after the restart")
    for member in (ana, ben):
        expect(member.messages("user")).to_have_count(2)
        expect(member.messages("user").nth(1)).to_contain_text("after the restart")
    status, body = api(url, f"/web/api/spaces/{space}", team.keys["ben"])
    assert status == 200
    assert [m["content"] for m in body["messages"]] == ["before the restart", "after the restart"]
    ana.close()
    ben.close()


# ---- images and the local workspace -----------------------------------------------------------


def test_an_uploaded_image_reaches_the_model(tiny: ServerProcess, browser: Browser, tmp_path: Path) -> None:
    """Two Spaces alike but for an image on the asking message: the model's prompt grows by the
    image's tokens. tiny (Mistral3 with vision) is served with a single --api-key, whose holder
    signs in as an admin."""
    assert api(tiny.url, "/web/api/me", "sk-test")[1]["model"]["tools"]  # Mistral: `remember` offered
    member = Member(browser, tiny.url).sign_in("sk-test")
    picture = tmp_path / "photo.png"
    picture.write_bytes(png(64, 48))
    prompts = []
    for image in (None, picture):
        new_space(member, "Photos")
        if image is not None:
            member.page.set_input_files("[data-testid=image-input]", str(image))
            expect(member.page.locator("[data-testid=attachment]")).to_have_count(1)  # read, ready to send
        member.send("@tiny describe it")
        expect(member.messages("assistant").first).to_have_attribute("data-status", "done", timeout=60_000)
        expect(member.messages("user").first.locator("img")).to_have_count(0 if image is None else 1)
        space = member.page.url.rsplit("/", 1)[1]
        answer = api(tiny.url, f"/web/api/spaces/{space}", "sk-test")[1]["messages"][1]
        prompts.append(answer["usage"]["prompt_tokens"])
    assert prompts[1] - prompts[0] > 2  # the image's tokens: [IMG]s, [IMG_BREAK]s, [IMG_END]
    member.close()


def test_a_late_reply_does_not_undo_a_finished_answer(tiny: ServerProcess, browser: Browser) -> None:
    """The tiny model answers in a fraction of a second: the stream can tell the page the answer is
    done before the POST that asked for it (or the regeneration) returns with the answer just begun.
    The browser here holds each reply until the server has finished the answer; the page must keep
    the finished answer (it showed "streaming…" forever in a CI run)."""
    member = Member(browser, tiny.url).sign_in("sk-test")
    space = new_space(member, "Fast answers")

    def held(route: Route) -> None:  # until the answer in the reply is done, in the store
        if route.request.method != "POST":
            return route.continue_()
        reply = route.fetch()
        body = reply.json()
        answer = body.get("answer") or body
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = api(tiny.url, f"/web/api/spaces/{space}", "sk-test")[1]["messages"][-1]
            if now["status"] == "done" and now["revision"] > answer["revision"]:
                break
            time.sleep(0.05)
        route.fulfill(response=reply)

    replies = re.compile(r".*/messages(/\d+/regenerate)?$")
    member.page.route(replies, held)
    member.page.evaluate(  # counts the replies the page has read: it handles each in the same task
        """(pattern) => {
        const fetched = window.fetch, replies = new RegExp(pattern);
        window.__replied = 0;
        window.fetch = (...args) => fetched(...args).then((res) => {
            if (!replies.test(String(args[0]))) return res;
            const read = res.json.bind(res);
            res.json = () => read().then((body) => { window.__replied++; return body; });
            return res;
        });
    }""",
        replies.pattern,
    )
    answer = member.messages("assistant").first
    member.send("@tiny quick")
    member.page.wait_for_function("() => window.__replied === 1", timeout=70_000)
    expect(answer).to_have_attribute("data-status", "done", timeout=1_000)
    first = api(tiny.url, f"/web/api/spaces/{space}", "sk-test")[1]["messages"][1]
    answer.locator("[data-testid=regenerate]").click()
    member.page.wait_for_function("() => window.__replied === 2", timeout=70_000)
    expect(answer).to_have_attribute("data-status", "done", timeout=1_000)
    again = api(tiny.url, f"/web/api/spaces/{space}", "sk-test")[1]["messages"][1]
    assert again["status"] == "done" and again["revision"] > first["revision"]
    member.close()


def test_local_workspace_opens_without_sign_in(demo: ServerProcess, browser: Browser) -> None:
    """A server with no keys (the demo one `make run` starts) is one local team: members name
    themselves in the page."""
    member = Member(browser, demo.url)
    member.page.goto(f"{demo.url}/")
    member.page.fill("[data-testid=display-name]", "Rosa")
    member.page.keyboard.press("Enter")
    space = new_space(member, f"Local {time.time()}")
    member.send("hello from the local workspace")
    expect(member.messages("user").first.locator("[data-testid=message-author]")).to_have_text("Rosa")
    assert member.page.locator("[data-testid=api-key]").count() == 0
    with urllib.request.urlopen(f"{demo.url}/web/api/spaces/{space}") as resp:  # GETs need no token
        assert json.load(resp)["messages"][0]["author"] == "Rosa"
    with urllib.request.urlopen(f"{demo.url}/web/api/me") as resp:
        assert json.load(resp)["model"]["tools"] is False  # no tool-call format: no `remember` tool
    member.close()


# ---- what the model reads -------------------------------------------------------------------------


def test_mentions_turns_and_proposals(tmp_path: Path) -> None:
    assert mentions("hey @smollm2, a question", "smollm2") and mentions("@smollm2", "smollm2")
    assert not mentions("mail me at me@smollm2.org", "smollm2") and not mentions("@smollm2x", "smollm2")
    assert forced_tool("@m /tools_add 2 and 3", ["tools_add"]) == "tools_add"
    assert forced_tool("@m see /etc and a/tools_add or /tools_add.py", ["tools_add"]) is None

    def message(role: str, author: str, content: str, status: str = "done", **extra: Any) -> dict[str, Any]:
        return {"role": role, "author": author, "content": content, "status": status, "images": []} | {
            "tool_calls": [],
            **extra,
        }

    call = {
        "type": "mcp_call",
        "id": "mcp_1",
        "call_id": "c1",
        "model_name": "tools_add",
        "server_label": "tools",
        "name": "add",
        "arguments": '{"a": 2, "b": 3}',
        "output": "2 + 3 = 5",
        "error": None,
        "status": "completed",
    }
    running = {**call, "id": "mcp_2", "status": "in_progress", "output": None}
    thread = [
        message("user", "Ana", "one", images=["/web/api/images/a"]),
        message("user", "Ben", "two"),
        message("assistant", "m", "half", "error"),
        message(
            "assistant",
            "m",
            "answer",
            tool_calls=[call, running, {"type": "function_call", "name": "remember"}],
        ),
        message("user", "Ana", "@m three"),
    ]
    items = thread_items(thread, {"/web/api/images/a": "data:image/png;base64,AA"})
    # Ana and Ben merged; no failed answer; the earlier answer's finished MCP call before its text
    assert [i.get("role", i["type"]) for i in items] == ["user", "mcp_call", "assistant", "user"]
    assert items[0]["content"] == [
        {"type": "input_text", "text": "Ana: one"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA"},
        {"type": "input_text", "text": "Ben: two"},
    ]
    messages = to_messages(items)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "user"]
    assert messages[1]["tool_calls"][0]["function"] == {"name": "tools_add", "arguments": '{"a": 2, "b": 3}'}
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "2 + 3 = 5"}
    assert thread_items(thread[:1], None)[0]["content"] == [
        {"type": "input_text", "text": "Ana: one [1 image(s)]"}
    ]

    store = Store(tmp_path / "spaces.db")
    space = store.create_space("t", "Space", "Ana")["id"]
    answers = Answers(None, store, Hub(), None, None)  # type: ignore[arg-type]
    state = type("State", (), {"model_name": "m"})()
    assert "member will confirm" in answers.propose(state, space, '{"note": " Ships Friday. "}')
    for bad in ('{"note": ""}', "not json", "[1]", '{"other": 1}'):
        assert answers.propose(state, space, bad).startswith("error: ")  # what the model reads back
    assert [(n["text"], n["author"], n["status"]) for n in store.notes(space)] == [
        ("Ships Friday.", "m", "proposed")
    ]
    with pytest.raises(TypeError):  # a write that fails midway is rolled back, not left open
        store.update_note(999_999, text="nobody's")
    store.add_note(space, "after the failure", "Ana")
    assert [n["text"] for n in Store(tmp_path / "spaces.db").notes(space)] == [
        "Ships Friday.",
        "after the failure",
    ]
    store.close()
