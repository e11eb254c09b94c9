"""The engine: requests in, token and text deltas out, one scheduler step at a time.

`Engine.step()` is the whole loop: propose (speculation, if on) → schedule → run the model once
over the flat batch → sample (and check proposals) → detokenize, check stops → free finished
sequences."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import llguidance as llg
import torch

from levante.distributed import tensor_parallel
from levante.engine.compiled import compile_runner
from levante.engine.fused import fuse_runner
from levante.engine.grammar import GrammarError, Grammars
from levante.engine.guard import repeating_tail
from levante.engine.huge_pages import use_huge_pages
from levante.engine.kv_cache import BlockManager, KVStore
from levante.engine.linears import use_linear_kernels
from levante.engine.runner import Runner, Step
from levante.engine.sampler import Sample, SampleRow, check, check_vocab, raw_logprobs, sample
from levante.engine.sampling_params import RepetitionDetection, SamplingParams
from levante.engine.scheduler import Scheduler
from levante.engine.sequence import ImageSpan, Sequence
from levante.engine.speculative import DraftModel, NgramIndex, SpeculativeConfig
from levante.engine.stops import StopStrings
from levante.errors import LevanteError
from levante.model import Model
from levante.reference import DenseKVCache
from levante.tokenizer import IncrementalDetokenizer, PromptInputs, Tokenizer

log = logging.getLogger("levante.engine")

GiB = 1 << 30


class RequestError(ValueError):
    """A request the engine can never serve (too long, cannot fit the cache, bad parameter)."""


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: float | None = None  # GiB; None: memory_fraction of the device after warm-up
    memory_fraction: float = 0.9  # on CUDA; on CPU a quarter of the memory available after loading
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # default: the model's context length
    prefix_caching: bool = True
    batch_invariant: bool = True  # a token's logits independent of the rest of the batch (see linears)
    loop_guard: RepetitionDetection | None = None  # applied to requests that do not set their own
    kv_cache_dtype: str = "auto"  # auto (the model's dtype), fp8 (= fp8_e4m3), fp8_e4m3, fp8_e5m2
    # the step compiled at start (see `compiled`), and on CPU the weights moved to huge pages (see
    # `huge_pages`); the library's default stays eager, the reference (and the test suite's engines
    # start in a second, not a compile's quarter minute); the CLI compiles unless --enforce-eager,
    # as vLLM
    compile: bool = False
    # with `compile`, on CPU: the paged step's layers in one call of Levante's kernels where the
    # model allows it (see `fused`; same bits as eager, no compile); False: Inductor compiles them
    fuse_layers: bool = True
    speculative: SpeculativeConfig | None = None  # speculative decoding: prompt lookup or a draft model

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {self.kv_cache_dtype!r}"
            )


# vLLM's names; fp8 stores what is stored saturated to the format's largest finite value, unscaled
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@dataclass
class Output:
    """What one sequence produced in one step."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[Sample] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # stop | length | repetition | abort
    stop_reason: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    arrival: float = 0.0  # time.monotonic() of add_request
    scheduled_at: float | None = None  # when the request first ran (queue time = this - arrival)
    prompt_logprobs: list[Sample | None] | None = None  # on the first output of choice 0, if asked
    spec_proposed: int = 0  # speculation so far: tokens proposed for this sequence, and kept
    spec_accepted: int = 0


@dataclass
class _Track:
    """Per-sequence output state the model side does not need."""

    detok: IncrementalDetokenizer
    stops: StopStrings
    pending: list[int] = field(default_factory=list)
    pending_logprobs: list[Sample] = field(default_factory=list)
    # prompt positions scored so far ([None] for the first token); None once sent or not asked
    prompt_logprobs: list[Sample | None] | None = None
    matcher: llg.LLMatcher | None = None  # where the sequence stands in its grammar, if it has one
    pending_text: list[str] = field(default_factory=list)  # text of tokens kept this step, not sent yet
    ngrams: NgramIndex | None = None  # speculation's lookup table, built at its first proposal


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    loop_stops: int = 0
    spec_drafts: int = 0  # steps a sequence fed proposals in (vLLM's spec_decode_num_drafts)
    spec_draft_tokens: int = 0  # tokens proposed and checked
    spec_accepted_tokens: int = 0  # of those, kept


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        self.max_model_len = context_length(model, config)
        parallel = tensor_parallel.rank_and_world()[1] > 1
        self.runner = build_runner(model, config, tensor_parallel.broadcast_step if parallel else None)
        store = self.runner.attention.store
        num_blocks = store.num_blocks
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens)
        self.capacity = num_blocks * config.block_size
        self.batch_invariant = self.runner.batch_invariant
        log.info(
            "batch-invariant mode: %s",
            "on (a request's logits do not depend on the rest of the batch)"
            if self.batch_invariant
            else "off" + (" (Levante's CPU kernels cannot run here)" if config.batch_invariant else ""),
        )
        log.info(
            "KV cache: %d blocks of %d = %d tokens (%.2f GiB, %s); %.1f sequences of %d tokens fit",
            num_blocks,
            config.block_size,
            self.capacity,
            (store.k.nbytes + store.v.nbytes) / GiB,
            str(store.k.dtype).removeprefix("torch."),
            self.capacity / self.max_model_len,
            self.max_model_len,
        )
        self.grammars = Grammars(tokenizer.guidance_tokenizer, model.config.text.vocab_size)
        spec = config.speculative
        self.draft = load_draft(spec, model, tokenizer, config, self.max_model_len) if spec else None
        self.stats = EngineStats()
        self._seqs: dict[str, list[Sequence]] = {}
        self._tracks: dict[int, _Track] = {}
        self._next_id = 0
        self.step_log: list[list[tuple[str, int]]] = []  # per step: (request id, tokens fed), for tests
        self.keep_step_log = False

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptInputs, params: SamplingParams) -> None:
        """Queues a request (n sequences). Raises RequestError for a request that can never run."""
        if request_id in self._seqs:
            raise RequestError(f"request id {request_id!r} is already in use")
        tokens = list(prompt.tokens)
        if not tokens:
            raise RequestError("the prompt is empty")
        if len(tokens) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(tokens)} tokens but the context is {self.max_model_len}; "
                "shorten it or start the server with a larger --max-model-len"
            )
        if len(tokens) + 1 > self.capacity:
            raise RequestError(
                f"the prompt ({len(tokens)} tokens) can never fit the KV cache ({self.capacity})"
            )
        try:
            check_vocab(params, self.model.config.text.vocab_size)
        except ValueError as e:
            raise RequestError(str(e)) from None
        if params.repetition_detection == RepetitionDetection() and self.config.loop_guard is not None:
            params = replace(params, repetition_detection=self.config.loop_guard)
        images = self._image_spans(tokens, prompt.images)
        grammar = params.grammar
        try:
            matchers = [self.grammars.matcher(grammar) for _ in range(params.n)] if grammar else []
        except GrammarError as e:
            raise RequestError(f"the grammar does not compile: {e}") from None
        now = time.monotonic()
        seqs = []
        for i in range(params.n):
            seq = Sequence(self._next_id, request_id, i, tokens, params, now, images=images)
            self._next_id += 1
            if not params.greedy:
                seed = params.seed + i if params.seed is not None else random.getrandbits(62)
                seq.generator = torch.Generator(device=self.runner.device).manual_seed(seed)
            self._tracks[seq.seq_id] = _Track(
                detok=self.tokenizer.detokenizer(skip_special=params.skip_special_tokens),
                stops=StopStrings(params.stop, params.include_stop_str_in_output),
                prompt_logprobs=[None] if params.prompt_logprobs is not None and i == 0 else None,
                matcher=matchers[i] if matchers else None,
            )
            self.scheduler.add(seq)
            seqs.append(seq)
        self._seqs[request_id] = seqs

    def _image_spans(self, tokens: list[int], images: list) -> list[ImageSpan]:
        if not images:
            return []
        if self.model.vision is None:
            raise RequestError("this model does not accept images")
        image_id, m = self.model.config.image_token_id, self.model.config.spatial_merge_size
        patch = self.model.config.vision.patch_size if self.model.config.vision else 1
        where = [i for i, t in enumerate(tokens) if t == image_id]
        spans, start = [], 0
        for img in images:
            pixels = img if isinstance(img, torch.Tensor) else torch.from_numpy(img)
            count = (pixels.shape[1] // (patch * m)) * (pixels.shape[2] // (patch * m))
            if start + count > len(where):
                raise RequestError("the prompt has fewer image tokens than its images need")
            spans.append(
                ImageSpan(where[start], where[start + count - 1], pixels, ImageSpan.content_hash(pixels))
            )
            start += count
        if start != len(where):
            raise RequestError("the prompt has more image tokens than its images need")
        return spans

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees all its blocks at once; False if it is unknown or done."""
        seqs = self._seqs.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.finish_reason = "abort"
                self._count_finish(seq)
            self._tracks.pop(seq.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[Output]:
        self._propose()
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        outputs = [self._finish(seq, "length", None) for seq in batch.out_of_memory]
        if not batch.items:
            return outputs
        if self.keep_step_log:
            self.step_log.append([(seq.request_id, n) for seq, n in batch.items])
        full = frozenset(i for i, (seq, _) in enumerate(batch.items) if self._scores_prompt(seq))
        checked = frozenset(i for i, (seq, _) in enumerate(batch.items) if seq.draft)
        logits = self.runner.run(batch.items, full | checked)
        sampling: list[tuple[Sequence, int]] = []
        verifying: list[tuple[Sequence, int]] = []
        row = 0
        for i, (seq, n) in enumerate(batch.items):
            if i in checked:  # its last token and the proposals after it: a row each
                verifying.append((seq, row))
                row += n
                continue
            start = seq.num_computed
            seq.num_computed += n
            if i in full:
                self._score_prompt(seq, start, logits[row : row + n])
            row += n if i in full else 1
            if seq.images and seq.num_computed > seq.images[-1].last:
                seq.image_embeds = None  # the prefill has consumed every image
            if seq.num_computed == len(seq):
                if seq.params.max_tokens == 0:  # echo-only scoring: nothing to generate
                    outputs.append(self._finish(seq, "length", None))
                else:
                    sampling.append((seq, row - 1))
            self.stats.prompt_tokens += max(0, min(seq.num_computed, len(seq.prompt)) - start)
        outputs += [out for seq, first in verifying if (out := self._verify(seq, logits, first)) is not None]
        if not sampling:
            return outputs
        rows = [
            SampleRow(s.params, s.prompt, s.output, s.generator, self.tokenizer.eos_token_ids)
            for s, _ in sampling
        ]
        self._mask_by_grammar([s for s, _ in sampling], rows)
        samples = sample(logits[[r for _, r in sampling]], rows)
        for (seq, _), smp in zip(sampling, samples, strict=True):
            out = self._append(seq, smp)
            if out is not None:
                outputs.append(out)
        return outputs

    def _propose(self) -> None:
        """Proposals for the running greedy sequences that are decoding, where speculation is on
        and the batch is small enough for the extra rows to cost little."""
        spec = self.config.speculative
        running = self.scheduler.running
        if spec is None:
            return
        busy = len(running) > spec.disable_by_batch_size
        wanted: list[tuple[Sequence, int]] = []
        for seq in running:
            seq.draft = []
            track = self._tracks[seq.seq_id]
            params = seq.params
            # a seeded request's draws must not depend on whether the step was busy: it decodes plainly
            seeded = not params.greedy and params.seed is not None
            if busy or seq.num_remaining != 1 or seeded:
                continue  # also prefilling
            left = self.max_model_len - len(seq) - 1
            if params.max_tokens is not None:
                left = min(left, params.max_tokens - len(seq.output) - 1)
            if left <= 0:
                continue
            k = min(spec.num_speculative_tokens, left)
            if self.draft is not None:
                wanted.append((seq, k))
                continue
            if track.ngrams is None:
                track.ngrams = NgramIndex(spec.prompt_lookup_min, spec.prompt_lookup_max)
            seq.draft = track.ngrams.propose(seq.tokens, k)
        if self.draft is not None:
            self.draft.sync(running)
            self.draft.propose(wanted)

    def _verify(self, seq: Sequence, logits: torch.Tensor, first: int) -> Output | None:
        """Keeps the proposals the model agrees with, then its own next token: row j of the
        sequence's logits scores the token after its last one and j proposals. Greedy, a proposal
        is kept where it is the argmax; sampled, by the rejection rule (`sampler.check`), so the
        answer's distribution is the model's. Each kept token goes through every check a decoded
        one does (stops, max_tokens, the loop guard), in order."""
        draft, start = seq.draft, seq.num_computed
        seq.draft = []
        self.stats.spec_drafts += 1
        self.stats.spec_draft_tokens += len(draft)
        seq.spec_proposed += len(draft)
        eos = self.tokenizer.eos_token_ids
        for j in range(len(draft) + 1):
            seq.num_computed = start + 1 + j  # the K/V of the last token and j kept proposals
            row = SampleRow(seq.params, seq.prompt, seq.output, seq.generator, eos)
            self._mask_by_grammar([seq], [row])  # the grammar where the kept tokens have taken it
            scores = logits[first + j : first + j + 1]
            if j < len(draft) and not seq.params.greedy:
                smp, kept = check(scores, row, draft[j])
                last = not kept
            else:
                smp = sample(scores, [row])[0]
                last = j == len(draft) or smp.token != draft[j]
            self.stats.spec_accepted_tokens += not last
            seq.spec_accepted += not last
            out = self._append(seq, smp, emit=last)
            if seq.finished or last:
                return out
        return None

    def _mask_by_grammar(self, seqs: list[Sequence], rows: list[SampleRow]) -> None:
        """Gives each constrained row the tokens its grammar allows, all computed in one call."""
        constrained = [
            (row, matcher)
            for seq, row in zip(seqs, rows, strict=True)
            if (matcher := self._tracks[seq.seq_id].matcher) is not None
        ]
        if constrained:
            allowed = self.grammars.allowed([m for _, m in constrained])
            for (row, _), mask in zip(constrained, allowed, strict=True):
                row.allowed = mask

    def _scores_prompt(self, seq: Sequence) -> bool:
        scored = self._tracks[seq.seq_id].prompt_logprobs
        return scored is not None and len(scored) < len(seq.prompt)

    def _score_prompt(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logprobs of the prompt tokens this chunk's logits predict (row k scores token start+k+1);
        a recompute after preemption skips the ones already scored."""
        scored = self._tracks[seq.seq_id].prompt_logprobs
        assert scored is not None
        first, end = len(scored), min(start + len(logits) + 1, len(seq.prompt))
        if end <= first:
            return
        tokens = seq.prompt[first:end]
        k = seq.params.prompt_logprobs or 0
        found = raw_logprobs(logits[first - 1 - start : end - 1 - start], tokens, [k] * len(tokens))
        scored += [Sample(t, lp, top) for t, (lp, top) in zip(tokens, found, strict=True)]

    def _append(self, seq: Sequence, smp: Sample, emit: bool = True) -> Output | None:
        """Takes one token: an Output when the sequence finishes or `emit`, else the token and its
        text wait for the next one (speculation keeps several tokens a step, sent together)."""
        seq.output.append(smp.token)
        self.stats.generation_tokens += 1
        track = self._tracks[seq.seq_id]
        params, token = seq.params, smp.token
        track.pending.append(token)
        if params.logprobs is not None:
            track.pending_logprobs.append(smp)
        if token in self.tokenizer.eos_token_ids and not params.ignore_eos:
            return self._finish(seq, "stop", None)
        if token in params.stop_token_ids:
            return self._finish(seq, "stop", token)
        text, stopped = track.stops.feed(track.detok.add(token))
        if stopped is not None:
            return self._finish(seq, "stop", stopped, text)
        if track.matcher is not None and self._grammar_done(seq, track.matcher, token):
            return self._finish(seq, "stop", None, text)
        if (params.max_tokens is not None and len(seq.output) >= params.max_tokens) or len(
            seq
        ) >= self.max_model_len:
            return self._finish(seq, "length", None, text)
        if params.repetition_detection.enabled and repeating_tail(seq.output, params.repetition_detection):
            self.stats.loop_stops += 1
            return self._finish(seq, "repetition", None, text)
        if not emit:
            track.pending_text.append(text)
            return None
        return self._emit(seq, text)

    def _grammar_done(self, seq: Sequence, matcher: llg.LLMatcher, token: int) -> bool:
        """Advances the grammar; True once it admits nothing but the end, which is then taken as
        reached (saving a step for EOS). A token the mask allowed is always accepted, so a refusal
        is an llguidance fault: logged, and the answer ends rather than going on unconstrained."""
        if matcher.consume_token(token):
            return matcher.is_stopped()
        log.error("request %s: grammar refused token %d: %s", seq.request_id, token, matcher.get_error())
        return True

    def _emit(self, seq: Sequence, text: str, finished: bool = False) -> Output:
        track = self._tracks[seq.seq_id]
        if track.pending_text:
            text = "".join(track.pending_text) + text
            track.pending_text.clear()
        out = Output(
            seq.request_id,
            seq.index,
            track.pending,
            text,
            track.pending_logprobs,
            finished,
            seq.finish_reason,
            seq.stop_reason,
            len(seq.prompt),
            seq.num_cached,
            len(seq.output),
            seq.arrival,
            seq.scheduled_at,
            track.prompt_logprobs,
            seq.spec_proposed,
            seq.spec_accepted,
        )
        track.pending, track.pending_logprobs, track.prompt_logprobs = [], [], None
        return out

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, text: str = "") -> Output:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        track = self._tracks[seq.seq_id]
        if reason != "stop" or not isinstance(stop_reason, str):
            tail, _ = track.stops.feed(track.detok.flush(), final=True)
            text += tail
        self.scheduler.remove(seq)
        self._count_finish(seq)
        out = self._emit(seq, text, finished=True)
        seqs = self._seqs.get(seq.request_id, [])
        if all(s.finished for s in seqs):
            self._seqs.pop(seq.request_id, None)
            for s in seqs:
                self._tracks.pop(s.seq_id, None)
        return out

    def _count_finish(self, seq: Sequence) -> None:
        """Counts a sequence that finished or was aborted (and frees its draft-model cache)."""
        if self.draft is not None:
            self.draft.release(seq.seq_id)
        reason = seq.finish_reason or "abort"
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1


def context_length(model: Model, config: EngineConfig) -> int:
    """The longest sequence served: the configured length, never beyond the model's."""
    text = model.config.text
    return min(config.max_model_len or text.max_position_embeddings, text.max_position_embeddings)


def load_draft(
    spec: SpeculativeConfig, model: Model, tokenizer: Tokenizer, config: EngineConfig, max_model_len: int
) -> DraftModel | None:
    """The draft model of a draft_model speculative config, loaded as the target was (its dtype and
    device); one whose tokenizer splits text otherwise than the target's is refused."""
    if spec.method != "draft_model":
        return None
    if tensor_parallel.rank_and_world()[1] > 1:
        raise LevanteError(
            "--speculative-config: a draft_model does not run with --tensor-parallel-size > 1 yet "
            "(its forward would wait on ranks that never run it); use the ngram method"
        )
    from levante.loader import load

    assert spec.model is not None
    weight = model.decoder.norm.weight
    dtype = str(weight.dtype).removeprefix("torch.")
    loaded = load(spec.model, dtype=dtype, device=str(weight.device), progress=False)
    probe = "Levante checks the draft's tokenizer: 12 apples, ünïcode, </s> and [TOOL_CALLS]."
    same = (
        loaded.tokenizer.vocab_size == tokenizer.vocab_size
        and loaded.tokenizer.eos_token_ids == tokenizer.eos_token_ids
        and loaded.tokenizer.encode(probe, add_bos=False) == tokenizer.encode(probe, add_bos=False)
    )
    if not same:
        raise LevanteError(
            f"--speculative-config: model: {spec.model}'s tokenizer is not the target model's; a draft "
            "model must split text into the same tokens"
        )
    k, vocab = spec.num_speculative_tokens, model.config.text.vocab_size
    chunk = config.max_num_batched_tokens
    return DraftModel(
        loaded.model, config.block_size, max_model_len, spec.disable_by_batch_size, k, vocab, chunk
    )


def build_runner(model: Model, config: EngineConfig, publish: Callable[[Step], None] | None = None) -> Runner:
    """The model side of an engine: a paged KV cache as large as the device allows, and the runner
    over it. Each tensor-parallel rank builds its own in lockstep (the warm-up forward is
    collective), sized for the KV heads its attention layers hold; all take the smallest block
    count, so one block table addresses every rank's cache."""
    text = model.config.text
    weight = model.decoder.norm.weight
    invariant = use_linear_kernels(model, config.batch_invariant)  # repacked weights: before the KV budget
    if config.compile and weight.device.type == "cpu":  # set up for speed: weights on 2 MiB pages too
        use_huge_pages(model.decoder)
    kv_dtype = KV_CACHE_DTYPES[config.kv_cache_dtype] or weight.dtype
    kv_heads = model.decoder.layers[0].self_attn.num_kv_heads
    per_token = KVStore.bytes_per_token(text.num_layers, kv_heads, text.head_dim, kv_dtype)
    num_blocks = tensor_parallel.agree(_num_blocks(model, config, per_token, weight.device))
    if num_blocks < 1:
        raise RequestError("no memory left for the KV cache: lower the model size or raise --kv-cache-memory")
    store = KVStore(
        text.num_layers, num_blocks, config.block_size, kv_heads, text.head_dim, kv_dtype, weight.device
    )
    runner = Runner(model, store, config.block_size, publish, invariant)
    if config.compile and not (config.fuse_layers and fuse_runner(runner)):
        compile_runner(runner, config.max_num_seqs)
    return runner


def _num_blocks(model: Model, config: EngineConfig, per_token: int, device: torch.device) -> int:
    """KV budget: the configured GiB, else a fraction of what the device has left once the model
    is loaded and a warm-up forward of a full token budget has shown its peak."""
    max_model_len = context_length(model, config)
    if config.kv_cache_memory is not None:
        budget = config.kv_cache_memory * GiB
    elif device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _warm_up(model, min(config.max_num_batched_tokens, max_model_len), device)
        total = torch.cuda.mem_get_info(device)[1]
        budget = config.memory_fraction * total - torch.cuda.max_memory_allocated(device)
    else:
        budget = 0.25 * _available_cpu_memory()
    wanted = config.max_num_seqs * max_model_len * per_token  # no use allocating beyond this
    return int(min(budget, wanted) // (per_token * config.block_size))


def _warm_up(model: Model, n: int, device: torch.device) -> None:
    """One forward of n tokens, so the peak memory of a full step is known before the cache is sized."""
    ids = torch.zeros(n, dtype=torch.long, device=device)
    cache = DenseKVCache(len(model.decoder.layers))
    cache.plan([0], [n])
    with torch.inference_mode():
        model.logits(model(ids, torch.arange(n, device=device), cache))


def _available_cpu_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * GiB
