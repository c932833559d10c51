"""`RaylmConfig`: every section together, and the checks that span sections (or read files)."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from raylm.config.base import _Strict
from raylm.config.cluster import ClusterConfig
from raylm.config.data import DataConfig
from raylm.config.eval import EvalConfig
from raylm.config.model import ModelConfig
from raylm.config.serve import ServeConfig
from raylm.config.train import DeepSpeedConfig, TrainConfig
from raylm.config.tune import TuneConfig


class RaylmConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RaylmConfig":
        t, ds = self.train, self.deepspeed
        if t.global_batch_size is not None and t.global_batch_size != t.effective_global_batch:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} cannot be made from "
                f"micro_batch_size={t.micro_batch_size} x grad_accum_steps={t.grad_accum_steps} x "
                f"num_workers={t.num_workers} = {t.effective_global_batch}"
            )
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params: needs deepspeed.zero_stage=3")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
        if ds.precision == "fp16" and not t.use_gpu:
            raise ValueError("deepspeed.precision: fp16 needs train.use_gpu=true (CPU runs use fp32 or bf16)")
        if self.precision == "bf16" and ds.zero_stage == 0:
            raise ValueError("deepspeed.zero_stage: 0 with bf16 would accumulate gradients in bf16 (DeepSpeed "
                             "accumulates bf16 gradients in fp32 from ZeRO-1 on); use zero_stage 1, or fp32")
        if t.resume_universal and ds.zero_stage not in (1, 2):
            raise ValueError(
                f"train.resume_universal: needs deepspeed.zero_stage 1 or 2, not {ds.zero_stage} (" + (
                    "DeepSpeed's universal checkpoint converts ZeRO optimizer shards; ZeRO-0 writes none)"
                    if ds.zero_stage == 0 else "DeepSpeed 0.19.8 converts and loads a ZeRO-3 checkpoint, but the "
                    "resumed run's optimizer steps drift from the uninterrupted run's: not an exact resume)"))
        if t.resume_universal and (t.lora or t.objective == "grpo"):
            raise ValueError(f"train.resume_universal: not with {'train.lora' if t.lora else 'train.objective grpo'} "
                             f"(raylm's universal resume is not built for it yet: full fine-tuning, lm or dpo objective)")
        for objective, fmt, what in (("dpo", "preference", "DPO trains on preference pairs only"),
                                     ("grpo", "prompt", "GRPO generates from prompt records only")):
            if (t.objective == objective) != (self.data.format == fmt):
                raise ValueError(f"train.objective: {t.objective!r} needs data.format "
                                 f"{fmt if t.objective == objective else 'other than ' + fmt} "
                                 f"(got {self.data.format!r}); {what}")
        if t.objective == "grpo" and not t.grpo.reward_funcs:
            raise ValueError("train.grpo.reward_funcs: GRPO needs at least one reward function "
                             "(e.g. [raylm.rewards:exact_match])")
        self._model_tokenizer()
        sv = self.serve
        if sv.default_max_tokens > sv.max_tokens_limit:
            raise ValueError("serve.default_max_tokens: must not exceed serve.max_tokens_limit")
        if sv.tensor_parallel_size > 1 and not sv.use_gpu:
            raise ValueError("serve.tensor_parallel_size: > 1 needs serve.use_gpu=true (tensor parallelism shards "
                             "over GPUs)")
        if sv.model_id in sv.lora_adapters:
            raise ValueError(f"serve.lora_adapters: {sv.model_id!r} is serve.model_id, the base model's name")
        if sv.max_model_len is not None and sv.max_tokens_limit >= sv.max_model_len:
            raise ValueError(f"serve.max_tokens_limit: {sv.max_tokens_limit} leaves no room for a prompt in "
                             f"serve.max_model_len={sv.max_model_len}")
        return self

    def _model_tokenizer(self) -> None:
        """A pretrained model (a Hub id or a folder, such as a raylm hf/ export) brings its vocabulary:
        the data stage uses its tokenizer unless data.tokenizer names another. A tokenizer trained on
        the corpus would feed ids the model's embeddings never learnt: refused. (Whether a named
        tokenizer's ids fit the embeddings is `raylm.data.check_tokenizer_fits`, before Ray starts.)"""
        if not self.model.pretrained:
            return
        explicit = "tokenizer" in self.data.model_fields_set
        if explicit and self.data.tokenizer == "train":
            raise ValueError(f"data.tokenizer: 'train' builds a new vocabulary, whose ids model.name="
                             f"{self.model.name} (a pretrained model) never learnt; leave data.tokenizer unset to "
                             f"use the model's own tokenizer, or name another one")
        if explicit:
            return
        local = os.path.expanduser(self.model.name)
        if os.path.isdir(local):
            if not os.path.isfile(os.path.join(local, "tokenizer_config.json")):
                raise ValueError(f"data.tokenizer: model.name={self.model.name} holds no tokenizer "
                                 f"(tokenizer_config.json); name one in data.tokenizer")
            self.data.tokenizer = os.path.abspath(local)
        else:  # a Hub id: transformers resolves it (from the HF cache offline, else the Hub)
            self.data.tokenizer = self.model.name

    @property
    def cpu_mmap_kib(self) -> int:
        """The malloc threshold CPU training workers set (train.cpu_mmap_threshold_kib): unset, 128 KiB
        under ZeRO-3 (the stage chosen to save memory) and glibc's own otherwise; 0 on GPU."""
        if self.train.use_gpu:
            return 0
        if self.train.cpu_mmap_threshold_kib is not None:
            return self.train.cpu_mmap_threshold_kib
        return 128 if self.deepspeed.zero_stage == 3 else 0

    @property
    def precision(self) -> str:
        """The precision that runs: 'auto' resolves to bf16 on GPU and fp32 on CPU."""
        if self.deepspeed.precision != "auto":
            return self.deepspeed.precision
        return "bf16" if self.train.use_gpu else "fp32"
