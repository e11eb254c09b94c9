"""Takes the README's screenshots of the web app: a real `levante serve` (the demo model, a team with
a budget) filled through the web API, photographed by Debian's chromium at desktop and phone widths.

    .venv/bin/python docs/screenshots.py      # writes docs/space-*.png and docs/model-*.png
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).parent
PORT = 18123
URL = f"http://127.0.0.1:{PORT}"
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def levante(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "levante.cli", *args], env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return done.stdout.strip()


def call(key: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(f"{URL}{path}", json.dumps(body).encode() if body is not None else None)
    request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.load(resp)


def wait_answer(key: str, space: str) -> None:
    for _ in range(600):
        if all(m["status"] != "streaming" for m in call(key, f"/web/api/spaces/{space}")["messages"]):
            return
        time.sleep(0.2)


def main() -> None:
    home = Path(tempfile.mkdtemp(prefix="levante-shots-"))
    env = {**os.environ, "LEVANTE_USAGE_DB": str(home / "usage.db"), "LEVANTE_ENFORCE_EAGER": "1"}
    ana = levante(env, "keys", "create", "--team", "acme", "--name", "Ana")
    ben = levante(env, "keys", "create", "--team", "acme", "--name", "Ben")
    levante(env, "keys", "set-budget", "--team", "acme", "5")
    (home / "generation_config.json").write_text(json.dumps({"temperature": 0.2}))  # a 135M model rambles hot
    args = ["serve", "--port", str(PORT), "--kv-cache-memory", "0.25", "--served-model-name", "smollm2"]
    args += ["--generation-config", str(home), "--space-max-tokens", "80"]
    server = subprocess.Popen(
        [sys.executable, "-m", "levante.cli", *args], env=env, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{URL}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        call(ana, "/web/api/spaces", {"title": "Support macros"})
        space = call(ana, "/web/api/spaces", {"title": "Q3 launch plan"})["id"]
        call(
            ana,
            f"/web/api/spaces/{space}/notes",
            {"text": "Launch date: September 30. Audience: self-hosters."},
        )
        call(ben, f"/web/api/spaces/{space}/notes", {"text": "Tone: plain words, no hype."})
        call(
            ben,
            f"/web/api/spaces/{space}/messages",
            {"content": "Draft is in `docs/launch.md` — **feedback by Friday**."},
        )
        call(
            ana,
            f"/web/api/spaces/{space}/messages",
            {"content": "@smollm2 give us three names for the launch"},
        )
        wait_answer(ana, space)
        call(ben, f"/web/api/spaces/{space}/messages", {"content": "@smollm2 and one sentence for the blog?"})
        wait_answer(ana, space)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            for size, (width, height) in SIZES.items():
                page = browser.new_context(viewport={"width": width, "height": height}).new_page()
                page.goto(f"{URL}/")
                page.fill("[data-testid=api-key]", ana)
                page.click("[data-testid=sign-in]")
                page.wait_for_selector("[data-testid=sign-out]")
                page.goto(f"{URL}/spaces/{space}")
                page.wait_for_selector("[data-testid=connection][data-state=open]")
                page.screenshot(path=DOCS / f"space-{size}.png")
                page.goto(f"{URL}/model")
                page.wait_for_selector("[data-testid=status-table]")
                page.screenshot(path=DOCS / f"model-{size}.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(home)


if __name__ == "__main__":
    main()
