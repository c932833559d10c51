"""Batched generation: many requests, one forward pass per decode step.

`Engine.generate_batch` is what `@serve.batch` wraps (see app.py): it receives the requests
that arrived together, left-pads their prompts into one tensor, runs the prefill and then one
decode step per generated token for all rows at once (KV cache, per-row temperature, top_p,
seed, stop strings and max_tokens). It is an async generator that yields, per step, one
`RowEvent` per request, or `StopAsyncIteration` for rows that already finished: exactly the
protocol of Serve's batched generators, so each caller gets its own stream of events and
streaming and non-streaming requests share the same forward passes. Finished rows are dropped
from the batch (and from the KV cache) so long requests do not pay for short ones.

Model work runs on one dedicated thread: the replica's event loop stays free to accept requests
(which then join the next batch), answer /health and run Serve's health check meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Optional, Union

import torch

from raylm.model import max_context

logger = logging.getLogger(__name__)

Event = Union["RowEvent", type]  # a RowEvent, or StopAsyncIteration once a row is finished


class ModelFault(RuntimeError):
    """The model cannot be trusted any more (non-finite logits, CUDA error, OOM): the replica
    reports itself unhealthy so Serve replaces it."""


@dataclass(frozen=True)
class GenRequest:
    """One row of a batch: token ids to continue and how to sample them."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowEvent:
    """New text of one row since its previous event; `finish_reason` is set on its last event."""

    text: str
    finish_reason: Optional[str]
    completion_tokens: int


@dataclass
class EngineStats:
    """Counters exposed on /v1/stats: forward_passes < requests * tokens proves batching."""

    forward_passes: int = 0  # batched prefills + batched decode steps
    batches: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    largest_batch: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class _Row:
    req: GenRequest
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    active: list[int]  # indices into rows, in tensor row order
    cache: Any = None
    mask: Optional[torch.Tensor] = None  # [active, seq] attention mask (0 on left padding)
    next_pos: Optional[torch.Tensor] = None  # [active] position id of the next token
    last_tokens: Optional[torch.Tensor] = None  # [active] tokens to feed next


# ------------------------------------------------------------------ pure helpers (unit-tested)


def stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could be the start of a stop string: they are held
    back from a stream until the next tokens show whether the stop string completes."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-k:]):
                best = k
                break
    return best


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from a row's logits: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p
        keep[..., 0] = True  # the top token always stays (0 < top_p fails once top_p rounds to 0 in float32)
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def row_generator(seed: Optional[int]) -> torch.Generator:
    """A per-request RNG: a seed makes sampling reproducible whatever else shares the batch."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


# ------------------------------------------------------------------ engine


class Engine:
    """A causal LM and its tokenizer behind a batched, streaming generate."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.context_len = max_context(model.config)
        self.stats = EngineStats()
        self.fatal_error: Optional[str] = None
        self.running_batches = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-model")

    # ---- text

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt; an empty prompt continues from EOS (like OpenAI's <|endoftext|>)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        return ids or [self.eos_id]

    def render_chat(self, messages: list[dict[str, str]]) -> Optional[str]:
        """The tokenizer's chat template applied to `messages`, or None when it has none."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- batched generation

    async def generate_batch(self, reqs: list[GenRequest]) -> AsyncIterator[list[Event]]:
        """Yield one event per request per decode step until every request has finished."""
        loop = asyncio.get_running_loop()
        self.running_batches += 1
        try:
            batch, events = await loop.run_in_executor(self._executor, self._guarded, self._prefill, reqs)
            yield events
            while batch.active:
                events = await loop.run_in_executor(self._executor, self._guarded, self._decode, batch)
                yield events
        finally:
            self.running_batches -= 1

    def _guarded(self, fn, arg):
        """Run model work; errors that mean the model/device is broken mark the engine fatal."""
        try:
            return fn(arg)
        except ModelFault as exc:
            self.fatal_error = str(exc)
            raise
        except RuntimeError as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError) or "CUDA" in str(exc):
                self.fatal_error = f"{type(exc).__name__}: {exc}"
            raise

    @torch.inference_mode()
    def _prefill(self, reqs: list[GenRequest]) -> tuple[_Batch, list[Event]]:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, req in enumerate(reqs):
            ids[i, width - len(req.prompt_ids):] = torch.tensor(req.prompt_ids, dtype=torch.long)
            mask[i, width - len(req.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        self._count_batch(reqs)
        batch = _Batch(rows=[_Row(r, row_generator(r.seed)) for r in reqs], active=list(range(len(reqs))),
                       cache=out.past_key_values, mask=mask, next_pos=positions[:, -1] + 1)
        return batch, self._advance(batch, out.logits[:, -1, :])

    @torch.inference_mode()
    def _decode(self, batch: _Batch) -> list[Event]:
        ones = torch.ones((len(batch.active), 1), dtype=batch.mask.dtype, device=self.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        out = self.model(input_ids=batch.last_tokens[:, None], attention_mask=batch.mask,
                         position_ids=batch.next_pos[:, None], past_key_values=batch.cache, use_cache=True)
        self.stats.forward_passes += 1
        batch.cache, batch.next_pos = out.past_key_values, batch.next_pos + 1
        return self._advance(batch, out.logits[:, -1, :])

    def _count_batch(self, reqs: list[GenRequest]) -> None:
        s = self.stats
        s.forward_passes += 1
        s.batches += 1
        s.requests += len(reqs)
        s.prompt_tokens += sum(len(r.prompt_ids) for r in reqs)
        s.largest_batch = max(s.largest_batch, len(reqs))

    def _pick(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """The next token of every active row (greedy rows need no copy of the full logits)."""
        if not bool(torch.isfinite(logits).all()):
            raise ModelFault("the model produced non-finite logits")
        rows = [batch.rows[i] for i in batch.active]
        greedy = torch.argmax(logits, dim=-1).tolist()
        if all(r.req.temperature == 0 for r in rows):
            return greedy
        host = logits.float().cpu()
        return [greedy[j] if r.req.temperature == 0 else
                sample_token(host[j], r.req.temperature, r.req.top_p, r.generator) for j, r in enumerate(rows)]

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> list[Event]:
        """Sample, turn new tokens into per-row events, and drop finished rows from the batch."""
        tokens = self._pick(batch, logits)
        events: list[Event] = [StopAsyncIteration] * len(batch.rows)
        for j, i in enumerate(batch.active):
            events[i] = self._row_event(batch.rows[i], tokens[j])
        self.stats.completion_tokens += len(tokens)
        keep = [j for j, i in enumerate(batch.active) if not batch.rows[i].done]
        next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if len(keep) < len(batch.active) and keep:
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            batch.cache.batch_select_indices(index)
            batch.mask, batch.next_pos, next_tokens = batch.mask[index], batch.next_pos[index], next_tokens[index]
        batch.active = [batch.active[j] for j in keep]
        batch.last_tokens = next_tokens
        return events

    def _row_event(self, row: _Row, token: int) -> RowEvent:
        row.ids.append(token)
        stops = row.req.stop
        text = self.decode(row.ids)
        finish = "stop" if token == self.eos_id else None
        cut = find_stop(text, stops) if stops else -1
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and len(row.ids) >= row.req.max_tokens:
            finish = "length"
        if finish is None:
            safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes to U+FFFD
            safe = min(safe, len(text) - stop_holdback(text, stops)) if stops else safe
        else:
            safe, row.done = len(text), True
        delta = text[row.emitted:safe] if safe > row.emitted else ""
        row.emitted = max(row.emitted, safe)
        return RowEvent(delta, finish, len(row.ids))

    # ---- health

    @torch.inference_mode()
    def _probe(self, _: Any = None) -> None:
        out = self.model(input_ids=torch.tensor([[self.eos_id]], device=self.device))
        if not bool(torch.isfinite(out.logits).all()):
            raise ModelFault("health probe: the model produced non-finite logits")

    async def check(self, timeout_s: float) -> None:
        """Raise when the model is unusable: a fatal error seen while generating, or (when idle) a
        one-token forward pass that fails, hangs past `timeout_s` or gives non-finite logits."""
        if self.fatal_error:
            raise ModelFault(self.fatal_error)
        if self.running_batches:
            return  # generation in progress is itself proof of life; it records fatal errors
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.run_in_executor(self._executor, self._guarded, self._probe, None), timeout_s)


def load_engine(checkpoint: str, num_gpus: float, num_threads: int) -> Engine:
    """Load a Hugging Face checkpoint: CUDA + bf16 when the replica has a GPU, else CPU fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_gpu = num_gpus > 0
    if not use_gpu:
        torch.set_num_threads(max(1, num_threads))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{checkpoint}: the tokenizer has no EOS token")
    dtype = torch.bfloat16 if use_gpu else torch.float32
    device = "cuda" if use_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device)
    logger.info("loaded %s on %s (%s)", checkpoint, device, dtype)
    return Engine(model, tokenizer, device)
