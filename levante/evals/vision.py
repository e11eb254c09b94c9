"""Vision suites: DocVQA (ANLS) and ChartQA (relaxed accuracy). Images go to the endpoint as
base64 data URLs in chat messages, as Mistral's own vision harness sends them; the bundled samples
draw their images with PIL at load time, so no image is stored in the package."""

from __future__ import annotations

import base64
import io
import json
import re
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, ImageDraw

from levante.cli import image_data_url
from levante.evals.suite import (
    Endpoint,
    Item,
    Record,
    Suite,
    data_file,
    greedy_params,
    mean_percent,
    sample_rows,
)


def normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one answer: the best 1 − NL over the accepted
    answers (NL: edit distance over the longer length, after lowercasing and collapsing spaces),
    counted only when it is above `threshold`. 0.5 is the official metric (NL < 0.5); 0.0 is
    Mistral's harness, which always gives the partial credit."""
    pred = normalize(prediction)
    best = 0.0
    for answer in answers:
        gold = normalize(answer)
        longest = max(len(pred), len(gold))
        best = max(best, 1.0 if longest == 0 else 1 - levenshtein(pred, gold) / longest)
    return best if best > threshold else 0.0


def to_number(text: str) -> float | None:
    """A numeric answer as written in charts: thousands commas, a currency sign or a trailing %
    are allowed ("1,234", "$5", "12.5%"); the % is kept as written (12.5), see `relaxed_correct`."""
    cleaned = text.strip().replace(",", "").lstrip("$").rstrip("%").strip()
    try:
        return float(cleaned)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str, tolerance: float = 0.05) -> bool:
    """ChartQA's relaxed accuracy: a number within 5% of the target's (relative; a zero target
    needs zero), anything else an exact case-insensitive match. A percentage may be written either
    way: "45%" matches 0.45 and 45, as Mistral's harness also tries p/100 and p·100."""
    pred, gold = to_number(prediction), to_number(target)
    if pred is None or gold is None:
        return normalize(prediction) == normalize(target)
    readings = {pred}
    if prediction.strip().endswith("%") or target.strip().endswith("%"):
        readings |= {pred / 100, pred * 100}
    if gold == 0:
        return 0.0 in readings
    return any(abs(p - gold) / abs(gold) <= tolerance + 1e-12 for p in readings)


def final_answer(text: str) -> str:
    """The text after the last "answer:" (the prompt asks for "Final Answer: …"), without
    markdown emphasis and a closing period; the whole reply when there is none."""
    *before, last = re.split(r"answer\s*:", text, flags=re.IGNORECASE)
    answer = last.strip().split("\n")[0] if before else text.strip()
    return re.sub(r"[*_`]", "", answer).strip().removesuffix(".").strip()


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def draw_document(lines: list[str]) -> Image.Image:
    """A white page with the lines in black, for the DocVQA sample."""
    image = Image.new("RGB", (448, 28 + 28 * len(lines)), "white")
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((16, 14 + 28 * i), line, fill="black")
    return image


def draw_bars(title: str, bars: dict[str, float]) -> Image.Image:
    """A labelled bar chart (value over each bar), for the ChartQA sample."""
    width, height, base = 448, 280, 240
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((16, 8), title, fill="black")
    top = max(bars.values())
    step = (width - 32) // len(bars)
    for i, (label, value) in enumerate(bars.items()):
        x = 16 + i * step + step // 4
        y = base - int(180 * value / top)
        draw.rectangle((x, y, x + step // 2, base), fill=(70, 110, 180))
        draw.text((x, y - 14), f"{value:g}", fill="black")
        draw.text((x, base + 8), label, fill="black")
    return image


class VisionSuite(Suite):
    default_max_tokens: ClassVar[int]

    @abstractmethod
    def instruction(self, question: str) -> str:
        """The text sent with the image."""

    def sampling(self) -> dict[str, Any]:
        return greedy_params(self.options, self.default_max_tokens)

    def settings(self) -> dict[str, Any]:
        return self.sampling()

    def needs(self) -> tuple[str, ...]:
        return ("images",)

    async def ask(self, item: Item, endpoint: Endpoint) -> tuple[list[dict[str, Any]], str]:
        """Sends the image and question; returns the prompt as recorded (image by name) and the reply."""
        text = self.instruction(item.data["question"])
        url = item.data["url"] if "url" in item.data else image_data_url(Path(item.data["image"]))
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        reply = await endpoint.chat([{"role": "user", "content": content}], **self.sampling())
        shown = [{"role": "user", "content": [{"image": item.data.get("image", "generated")}, text]}]
        return shown, reply.choices[0].message.content or ""

    def summarize(self, records: list[Record]) -> dict[str, float]:
        return mean_percent(records)


class DocVQA(VisionSuite):
    """Single-page DocVQA (validation split, the one with public answers), scored by ANLS at
    --anls-threshold: 0.5 the official metric, 0.0 Mistral's harness (settings say which)."""

    name = "docvqa"
    card: ClassVar[dict[str, float]] = {"anls": 94.86}
    data_files = (
        "docvqa/val_v1.0_withQT.json and the document images it names (docvqa/documents/…png): "
        "Single Page DocVQA, Task 1, from https://rrc.cvc.uab.es/?ch=17 "
        "(spdocvqa_qas and spdocvqa_images)"
    )
    default_max_tokens = 32

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            return [
                Item(r["id"], {**r, "url": png_url(draw_document(r["lines"]))})
                for r in sample_rows(self.name)
            ]
        path = data_file(data_dir, type(self), "val_v1.0_withQT.json")
        rows = json.loads(path.read_text())["data"]
        return [
            Item(
                str(r["questionId"]),
                {"question": r["question"], "answers": r["answers"], "image": str(path.parent / r["image"])},
            )
            for r in rows
        ]

    def settings(self) -> dict[str, Any]:
        return {"anls_threshold": self.options.anls_threshold, **super().settings()}

    def instruction(self, question: str) -> str:
        return f"{question}\nReply with the answer only: a single word or short phrase from the document."

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        prompt, reply = await self.ask(item, endpoint)
        score = anls(reply, item.data["answers"], self.options.anls_threshold)
        return Record(item.id, prompt, reply, {"anls": score}, {"answers": item.data["answers"]})


class ChartQA(VisionSuite):
    """ChartQA test (human-written and machine-generated questions, reported together and apart),
    scored by relaxed accuracy on the reply's "Final Answer:"."""

    name = "chartqa"
    card: ClassVar[dict[str, float]] = {"relaxed_accuracy": 87.4}
    data_files = (
        "chartqa/test/test_human.json, chartqa/test/test_augmented.json and chartqa/test/png/: the "
        '"ChartQA Dataset" folder of https://github.com/vis-nlp/ChartQA (GPL-3.0; never bundled)'
    )
    default_max_tokens = 2048

    def load(self, data_dir: Path | None, sample: bool) -> list[Item]:
        if sample:
            return [
                Item(r["id"], {**r, "url": png_url(draw_bars(r["title"], r["bars"]))})
                for r in sample_rows(self.name)
            ]
        items = []
        for split in ("human", "augmented"):
            path = data_file(data_dir, type(self), "test", f"test_{split}.json")
            for i, r in enumerate(json.loads(path.read_text())):
                image = str(path.parent / "png" / r["imgname"])
                items.append(
                    Item(
                        f"{split}/{i}",
                        {"question": r["query"], "answer": r["label"], "split": split, "image": image},
                    )
                )
        return items

    def instruction(self, question: str) -> str:
        return (
            f"{question}\nLook at the chart, reason briefly, and end your reply with a line "
            '"Final Answer: <answer>". Write the answer as one number or one short phrase: no units, '
            "no thousands separators, a percentage with a % sign, and Yes or No for yes/no questions."
        )

    async def run(self, item: Item, endpoint: Endpoint) -> Record:
        prompt, reply = await self.ask(item, endpoint)
        answer = final_answer(reply)
        correct = float(relaxed_correct(answer, item.data["answer"]))
        scores = {"relaxed_accuracy": correct, f"relaxed_accuracy_{item.data['split']}": correct}
        return Record(item.id, prompt, reply, scores, {"extracted": answer, "target": item.data["answer"]})
