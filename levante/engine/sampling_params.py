"""Per-request sampling parameters, validated up front so a bad value is an error naming the
field (the server turns it into a 400), never a crash inside a batch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RepetitionDetection:
    """vLLM-compatible loop guard: stop when the output's tail is one pattern of
    `min_pattern_size..max_pattern_size` tokens repeated at least `min_count` times in a row.
    `max_pattern_size == 0` turns it off."""

    max_pattern_size: int = 0
    min_pattern_size: int = 1
    min_count: int = 3

    def __post_init__(self) -> None:
        if self.max_pattern_size < 0:
            raise ValueError("repetition_detection.max_pattern_size must be >= 0")
        if self.min_pattern_size < 1:
            raise ValueError("repetition_detection.min_pattern_size must be >= 1")
        if self.max_pattern_size and self.min_pattern_size > self.max_pattern_size:
            raise ValueError("repetition_detection.min_pattern_size must be <= max_pattern_size")
        if self.min_count < 2:
            raise ValueError("repetition_detection.min_count must be >= 2")

    @property
    def enabled(self) -> bool:
        return self.max_pattern_size > 0


LOOP_GUARD_ON = RepetitionDetection(max_pattern_size=64, min_pattern_size=1, min_count=6)
"""What `--loop-guard` turns on: any 1..64-token pattern repeated 6 times in a row ends the answer."""


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = None  # None: until the context is full
    min_tokens: int = 0
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: also the top k
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    repetition_detection: RepetitionDetection = field(default_factory=RepetitionDetection)
    priority: int = 0  # lower runs first, as in vLLM
    grammar: str | None = None  # llguidance grammar (Lark or JSON) every generated token must follow

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.min_tokens >= 0, "min_tokens must be >= 0"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must be <= max_tokens",
            ),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (0.0 < self.repetition_penalty <= 100.0, "repetition_penalty must be in (0, 100]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (
                all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()),
                "logit_bias values must be in [-100, 100]",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be in [0, 20]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
