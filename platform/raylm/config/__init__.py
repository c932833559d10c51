"""The one typed config of raylm, one module per concern.

Every process (CLI, `ray job submit` entrypoint, Tune trial, Train worker, Serve replica)
works from a `RaylmConfig`. It is validated once on the driver before Ray starts, travels
as `model_dump()` and is re-validated wherever it lands, so a bad value fails early with
the dotted name of the field that caused it.

- `base`: the strict base model (unknown keys are errors), image versions, `expand`;
- `data`, `model`, `train` (with `deepspeed:`), `tune`, `serve`, `cluster`, `eval`: each stage's schema;
- `root`: `RaylmConfig` and the checks that span sections or read files;
- `loader`: YAML with `base:` inheritance, `--set` overrides, error messages naming the field.

Names are exported lazily (PEP 562), so `from raylm.config.train import TrainConfig` (a training
worker, the DeepSpeed dict) imports no Ray Serve; only `serve` (Ray Serve's AutoscalingConfig) does.
"""

from __future__ import annotations

import importlib
from typing import Any

from raylm.errors import ConfigError, InputError  # noqa: F401 - re-exported: raylm.config.InputError

_WHERE = {
    "RAY_VERSION": "base", "PYTHON_TAG": "base", "expand": "base",
    "SFTConfig": "data", "PreferenceConfig": "data", "PromptConfig": "data", "DataConfig": "data", "RECORD_FORMATS": "data",
    "ModelConfig": "model",
    "GRPOConfig": "grpo",
    "LoraConfig": "train", "DPOConfig": "train", "TrackingConfig": "train", "TrainConfig": "train", "DeepSpeedConfig": "train",
    "AshaConfig": "tune", "TuneConfig": "tune",
    "AutoscalingConfig": "serve", "ServeConfig": "serve", "PromoteConfig": "serve", "KeyLimitOverride": "serve",
    "KeyLimitsConfig": "serve",
    "ClusterConfig": "cluster",
    "EvalConfig": "eval",
    "RaylmConfig": "root",
    "read_yaml_tree": "loader", "apply_override": "loader", "validate_tree": "loader",
    "load_config": "loader", "dump_config": "loader",
}

__all__ = ["ConfigError", "InputError", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'raylm.config' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"raylm.config.{module}"), name)
    globals()[name] = value
    return value
