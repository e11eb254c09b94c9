"""The OpenAI-compatible server as users meet it: a real `levante serve` process on loopback,
driven by the official `openai` client (and raw HTTP where a client would refuse to send)."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image
from servers import ServerProcess, health, post

from levante.engine import LLM, EngineConfig, SamplingParams
from levante.tokenizer import PromptInputs, load_tokenizer

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def png(w: int, h: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def image_message(*urls: str) -> list[dict[str, Any]]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "what is this?"}]}]


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[re.sub(r',?model_name="[^"]*"', "", name).replace("{,", "{").replace("{}", "")] = float(value)
    return out


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A local web server with one PNG, to fetch from an allowed domain."""
    body = png(40, 30, seed=9)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/cat.png"
    httpd.shutdown()


# ---- chat -----------------------------------------------------------------------------------


def test_chat_plain_and_streamed_agree_and_usage_counts_tokens(
    client: openai.OpenAI, demo: ServerProcess
) -> None:
    plain = client.chat.completions.create(
        model=None, messages=CHAT, max_tokens=20, temperature=0, logprobs=True
    )  # type: ignore[arg-type]
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert plain.usage.completion_tokens == len(choice.logprobs.content) <= 20
    _, counted = post(demo.url, "/tokenize", {"messages": CHAT})
    assert plain.usage.prompt_tokens == counted["count"]
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=None,  # type: ignore[arg-type]
            messages=CHAT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_n_seed_stop_logprobs_and_max_tokens(client: openai.OpenAI) -> None:
    two = client.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1",
        messages=CHAT,
        n=2,
        max_tokens=8,
        temperature=1.0,
        seed=3,
        logprobs=True,
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    assert two.usage.completion_tokens == sum(len(c.logprobs.content) for c in two.choices)

    def sampled(seed: int) -> str:
        r = client.chat.completions.create(
            model=None, messages=CHAT, max_tokens=12, temperature=1.2, seed=seed
        )  # type: ignore[arg-type]
        return r.choices[0].message.content or ""

    assert sampled(11) == sampled(11)
    assert len({sampled(s) for s in (1, 2, 3, 4)}) > 1  # sampling really is random across seeds

    full = client.chat.completions.create(model=None, messages=CHAT, max_tokens=30, temperature=0)  # type: ignore[arg-type]
    text = full.choices[0].message.content or ""
    word = text.split()[2]
    stopped = client.chat.completions.create(
        model=None, messages=CHAT, max_tokens=30, temperature=0, stop=[word]
    )  # type: ignore[arg-type]
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(word)]

    capped = client.chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=CHAT,
        max_completion_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 4
    entries = capped.choices[0].logprobs.content
    assert len(entries) == 4
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].token == e.token  # greedy takes the top
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.logprob <= 0


def test_completions_echo_logprobs_equal_the_engines(client: openai.OpenAI) -> None:
    prompt = "The capital of France is Paris, and the capital of Italy is"
    r = client.completions.create(
        model=None, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2
    )  # type: ignore[arg-type]
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None

    llm = LLM(dtype="auto", engine=EngineConfig(kv_cache_memory=0.05))  # as the server
    ids = llm.tokenizer.encode(prompt, add_bos=llm.tokenizer.adds_bos)
    offline = llm.generate(
        PromptInputs(ids), SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2, logprobs=2)
    )[0]
    expected = [s.logprob for s in offline.prompt_logprobs[1:]] + [offline.outputs[0].logprobs[0].logprob]
    assert len(lp.token_logprobs) == len(ids) + 1 == r.usage.prompt_tokens + 1
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert lp.tokens[-1] == llm.tokenizer.decode(offline.outputs[0].token_ids, skip_special=False)
    assert r.choices[0].text == prompt + lp.tokens[-1]

    scored_only = client.completions.create(
        model=None,
        prompt=ids,
        max_tokens=0,
        echo=True,
        logprobs=0,  # type: ignore[arg-type]
    )
    assert scored_only.usage.completion_tokens == 0
    assert scored_only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected[:-1], abs=1e-4)


def test_completions_batch_of_prompts_and_token_prompts(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=None, prompt=["One, two,", "Red, green,"], n=2, max_tokens=3, temperature=0
    )  # type: ignore[arg-type]
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    texts = {c.index: c.text for c in r.choices}
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy choices of one prompt agree
    streamed = client.completions.create(
        model=None,
        prompt=["One, two,", "Red, green,"],
        max_tokens=3,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    joined: dict[int, str] = {}
    for chunk in streamed:
        for c in chunk.choices:
            joined[c.index] = joined.get(c.index, "") + c.text
    assert joined == {0: texts[0], 1: texts[2]}


def test_tokenize_detokenize_models_version(demo: ServerProcess, client: openai.OpenAI) -> None:
    status, tok = post(demo.url, "/tokenize", {"prompt": "hello world"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 2048
    status, detok = post(demo.url, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"].endswith("hello world")
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]
    with urllib.request.urlopen(f"{demo.url}/version") as resp:
        assert json.loads(resp.read())["version"]


def test_tokenize_takes_vllms_chat_fields(demo: ServerProcess, tiny: ServerProcess) -> None:
    """add_generation_prompt, continue_final_message and return_token_strs, as vLLM's clients send
    them: on a chat template (the demo) and on Mistral's format (tiny)."""
    chat = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Because"}]
    question = chat[:1]

    def tokenize(url: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
        status, out = post(url, "/tokenize", body, headers)
        assert status == 200, out
        return out

    opened = tokenize(demo.url, messages=question, return_token_strs=True)
    closed = tokenize(demo.url, messages=question, add_generation_prompt=False)
    assert (
        "".join(opened["token_strs"]).endswith("<|im_start|>assistant\n")
        and len(opened["token_strs"]) == opened["count"]
    )
    assert opened["tokens"][: closed["count"]] == closed["tokens"] and closed["count"] < opened["count"]
    going = tokenize(demo.url, messages=chat, add_generation_prompt=False, continue_final_message=True)
    text = post(demo.url, "/detokenize", {"tokens": going["tokens"]})[1]["prompt"]
    assert text.endswith("<|im_start|>assistant\nBecause")  # no end of turn: the model goes on

    key = {"Authorization": "Bearer sk-test"}
    asked = tokenize(tiny.url, key, messages=question)
    assert tokenize(tiny.url, key, messages=question, add_generation_prompt=False) == asked  # no header
    going = tokenize(tiny.url, key, messages=chat, add_generation_prompt=False, continue_final_message=True)
    assert going["tokens"][: asked["count"]] == asked["tokens"]
    tail = post(tiny.url, "/detokenize", {"tokens": going["tokens"][asked["count"] :]}, key)[1]["prompt"]
    assert tail.strip() == "Because"  # the answer so far, open
    both = {"messages": chat, "continue_final_message": True}
    status, error = post(demo.url, "/tokenize", both)
    assert status == 400 and error["error"]["param"] == "continue_final_message"
    status, error = post(
        demo.url,
        "/tokenize",
        {"messages": question, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert status == 400 and "final message" in error["error"]["message"]


# ---- images, keys, server defaults (tiny Mistral3) ------------------------------------------


def test_images_keys_and_generation_config_on_tiny_mistral(
    tiny: ServerProcess, tiny_mistral: Path, image_host: str
) -> None:
    client = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="sk-test", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert health(tiny.url) == 200  # health needs no key

    messages = image_message(data_url(png(64, 48, 1)), image_host)
    r = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    status, tok = post(tiny.url, "/tokenize", {"messages": messages}, {"Authorization": "Bearer sk-test"})
    assert status == 200 and r.usage.prompt_tokens == tok["count"]
    # the fetched image is the one the host serves, encoded by mistral-common like a data URL
    local = image_message(data_url(png(64, 48, 1)), data_url(png(40, 30, seed=9)))
    assert tok["tokens"] == load_tokenizer(tiny_mistral).encode_chat(local).tokens
    # generation_config.json: greedy and 5 tokens unless the request says otherwise
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model="tiny", messages=messages, extra_body={"ignore_eos": True})  # type: ignore[arg-type]
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # same images, same prefix blocks
    longer = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=7, extra_body={"ignore_eos": True}
    )  # type: ignore[arg-type]
    assert longer.usage.completion_tokens == 7

    gif = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(gif, format="GIF")
    ok = client.chat.completions.create(
        model="tiny", messages=image_message(data_url(gif.getvalue(), "gif")), max_tokens=1
    )  # type: ignore[arg-type]
    assert ok.choices[0].finish_reason in ("length", "stop")

    eleven = image_message(*[data_url(png(16, 16, i)) for i in range(11)])
    with pytest.raises(openai.BadRequestError, match="at most 10"):
        client.chat.completions.create(model="tiny", messages=eleven, max_tokens=1)  # type: ignore[arg-type]
    corrupt = data_url(png(32, 32)[:60])
    with pytest.raises(
        openai.BadRequestError, match=r"messages\[0\]\.content\[0\]\.image_url\.url: not a readable image"
    ):
        client.chat.completions.create(model="tiny", messages=image_message(corrupt), max_tokens=1)  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=1)


# ---- bad requests ---------------------------------------------------------------------------


def _bomb() -> bytes:
    """A small PNG whose header claims 7000 x 7000 pixels (over the 40M-pixel limit)."""
    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, format="PNG")
    return buf.getvalue()


BAD: list[tuple[str, str, Any, int, str]] = [
    # (name, endpoint, body, status, text the error message must contain)
    ("not json", "/v1/chat/completions", b"{not json", 400, "not a valid JSON"),
    ("body is a list", "/v1/chat/completions", [1, 2], 400, "valid JSON object"),
    ("no messages", "/v1/chat/completions", {"max_tokens": 3}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "bad role",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
    ),
    (
        "content wrong type",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        400,
        "messages[0].content",
    ),
    (
        "unknown part",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("unknown field", "/v1/chat/completions", {"messages": CHAT, "max_token": 5}, 400, "max_token"),
    ("negative max_tokens", "/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**9}, 400, "max_tokens"),
    ("max_tokens string", "/v1/chat/completions", {"messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    (
        "temperature too high",
        "/v1/chat/completions",
        {"messages": CHAT, "temperature": 5},
        400,
        "temperature",
    ),
    ("top_p zero", "/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("n zero", "/v1/chat/completions", {"messages": CHAT, "n": 0}, 400, "n"),
    (
        "top_logprobs alone",
        "/v1/chat/completions",
        {"messages": CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "top_logprobs too many",
        "/v1/chat/completions",
        {"messages": CHAT, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    (
        "logit_bias key",
        "/v1/chat/completions",
        {"messages": CHAT, "logit_bias": {"abc": 1}},
        400,
        "logit_bias",
    ),
    (
        "logit_bias token",
        "/v1/chat/completions",
        {"messages": CHAT, "logit_bias": {"99999999": 1}},
        400,
        "logit_bias",
    ),
    (
        "stop_token_ids",
        "/v1/chat/completions",
        {"messages": CHAT, "stop_token_ids": [-3]},
        400,
        "stop_token_ids",
    ),
    (
        "presence_penalty",
        "/v1/chat/completions",
        {"messages": CHAT, "presence_penalty": 3},
        400,
        "presence_penalty",
    ),
    (
        "loop guard",
        "/v1/chat/completions",
        {"messages": CHAT, "repetition_detection": {"max_pattern_size": 2, "min_pattern_size": 5}},
        400,
        "repetition_detection",
    ),
    (
        "tools on a model without a tool-call format",
        "/v1/chat/completions",
        {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    (
        "deprecated functions",
        "/v1/chat/completions",
        {"messages": CHAT, "functions": [{"name": "f"}]},
        400,
        "functions",
    ),
    (
        "prompt over context",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "word " * 3000}]},
        400,
        "maximum context length",
    ),
    (
        "bad base64",
        "/v1/chat/completions",
        {"messages": image_message("data:image/png;base64,@@@@")},
        400,
        "not valid base64",
    ),
    (
        "not a data url",
        "/v1/chat/completions",
        {"messages": image_message("data:image/png,abc")},
        400,
        "data URL",
    ),
    (
        "file url",
        "/v1/chat/completions",
        {"messages": image_message("file:///etc/passwd")},
        400,
        "image_url.url",
    ),
    (
        "remote url by default",
        "/v1/chat/completions",
        {"messages": image_message("http://169.254.169.254/x.png")},
        400,
        "not allowed",
    ),
    (
        "decompression bomb",
        "/v1/chat/completions",
        {"messages": image_message(data_url(_bomb()))},
        400,
        "over the limit",
    ),
    (
        "images on a text model",
        "/v1/chat/completions",
        {"messages": image_message(data_url(png(8, 8)))},
        400,
        "image",
    ),
    ("completion without prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("token prompt out of vocab", "/v1/completions", {"prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("suffix", "/v1/completions", {"prompt": "a", "suffix": "b"}, 400, "suffix"),
    ("best_of", "/v1/completions", {"prompt": "a", "best_of": 3}, 400, "best_of"),
    ("logprobs too many", "/v1/completions", {"prompt": "a", "logprobs": 99}, 400, "logprobs"),
    ("max_tokens 0 without echo", "/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("detokenize bad ids", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("tokenize neither", "/tokenize", {}, 400, "prompt"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404, "gpt-9"),
]


@pytest.mark.parametrize(("name", "path", "body", "status", "text"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_clear_4xx(
    demo: ServerProcess, name: str, path: str, body: Any, status: int, text: str
) -> None:
    got, reply = post(demo.url, path, body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"] or text == error["param"], error


def test_server_still_answers_after_bad_requests(client: openai.OpenAI, demo: ServerProcess) -> None:
    for _, path, body, _, _ in BAD:
        post(demo.url, path, body)
    r = client.chat.completions.create(model=None, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason in ("length", "stop")
    assert metrics(demo.url)["levante:kv_cache_usage_perc"] == 0.0


# ---- disconnects, metrics, shutdown ---------------------------------------------------------


def test_disconnected_stream_frees_its_blocks_within_a_second(demo: ServerProcess) -> None:
    host, port = demo.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"messages": CHAT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for _ in range(4):  # a few tokens in: the request is running and holds blocks
        assert resp.readline().startswith(b"data: ")
        resp.readline()
    before = metrics(demo.url)
    assert before["levante:num_requests_running"] == 1 and before["levante:kv_cache_usage_perc"] > 0
    resp.close()  # the client goes away mid-answer
    conn.close()
    closed = time.monotonic()
    while time.monotonic() - closed < 1.0:
        now = metrics(demo.url)
        if now["levante:kv_cache_usage_perc"] == 0 and now["levante:num_requests_running"] == 0:
            break
        time.sleep(0.02)
    assert now["levante:kv_cache_usage_perc"] == 0 and now["levante:num_requests_running"] == 0
    assert now['levante:request_success_total{finished_reason="abort"}'] >= 1


def test_metrics_histograms_move_with_traffic(client: openai.OpenAI, demo: ServerProcess) -> None:
    before = metrics(demo.url)
    client.chat.completions.create(
        model=None, messages=CHAT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )  # type: ignore[arg-type]
    after = metrics(demo.url)
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_time_per_output_token_seconds",
    ):
        assert after[f"levante:{name}_count"] == before.get(f"levante:{name}_count", 0) + 1, name
    assert (
        after["levante:inter_token_latency_seconds_count"]
        >= before.get("levante:inter_token_latency_seconds_count", 0) + 5
    )
    assert after["levante:generation_tokens_total"] >= before["levante:generation_tokens_total"] + 6
    assert after["levante:prompt_tokens_total"] > before["levante:prompt_tokens_total"]
    assert after["levante:prefix_cache_queries_total"] > before["levante:prefix_cache_queries_total"]
    assert after['levante:request_success_total{finished_reason="length"}'] >= 1
    assert "levante:num_requests_waiting" in after
    log = demo.log.read_text()
    assert re.search(
        r"chatcmpl-\w+ prompt_tokens=\d+ cached_tokens=\d+ completion_tokens=6 ttft=[\d.]+s", log
    )
    assert "rainbow" not in log  # no prompt text unless --log-prompts


def test_starting_queue_full_body_limit_and_sigterm_drain(tmp_path: Path) -> None:
    server = ServerProcess(
        [
            "--kv-cache-memory",
            "0.1",
            "--max-num-seqs",
            "1",
            "--max-queue",
            "1",
            "--max-request-bytes",
            "20000",
        ],
        tmp_path / "server.log",
    )
    try:
        server.wait_ready()
        assert server.statuses[0] == 503 and server.statuses[-1] == 200  # 503 while loading
        status, reply = post(
            server.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 30000}]}
        )
        assert status == 413 and "20000 bytes" in reply["error"]["message"]

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        long = {
            "model": None,
            "messages": CHAT,
            "max_tokens": 40,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        first = client.chat.completions.create(stream=True, **long)  # type: ignore[call-overload]
        next(iter(first))  # running (the one batch slot)
        results: list[Any] = []
        waiting = threading.Thread(target=lambda: results.append(client.chat.completions.create(**long)))
        waiting.start()
        deadline = time.monotonic() + 30
        while metrics(server.url)["levante:num_requests_waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(**long)
        assert full.value.response.headers["retry-after"] == "1"

        server.proc.send_signal(signal.SIGTERM)  # mid-stream: both requests must still complete
        time.sleep(0.3)
        assert health(server.url) in (503, None)  # draining: no new work
        rest = list(first)
        assert rest[-1].choices[0].finish_reason == "length"
        assert sum(1 for c in rest if c.choices and c.choices[0].delta.content) >= 35
        waiting.join(timeout=120)
        assert results and results[0].usage.completion_tokens == 40
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
