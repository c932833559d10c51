"""Experiment tracking from rank 0: TensorBoard event files always, MLflow when asked.

Every report the train loop writes to metrics.jsonl also goes here, so TensorBoard (and MLflow)
show the same numbers: loss, val_loss, perplexity, lr, tokens/s, grad norm (and MFU on GPU), and
DPO's rewards/* (training) and val_rewards/* (validation).
A sweep's trials each have their own run folder, so each gets its own event files.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from raylm.config import RaylmConfig

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")  # DPO
SCALARS = ("loss", "val_loss", "perplexity", "lr", "tokens_per_s", "grad_norm", "mfu", "skipped_steps", *REWARDS,
           *(f"val_{k}" for k in REWARDS))
TB_DIR = "tensorboard"


def tag(key: str) -> str:
    """TensorBoard tag: val/<name> for validation numbers, train/<name> for the rest."""
    if key.startswith("val_rewards/"):
        return "val/" + key.removeprefix("val_")
    return f"val/{key}" if key in ("val_loss", "perplexity") else f"train/{key}"


def mlflow_uri(cfg: RaylmConfig, root: str) -> str:
    """The tracking URI: train.tracking.mlflow_uri, else a file store <storage>/mlruns."""
    return cfg.train.tracking.mlflow_uri or "file://" + os.path.join(root, "mlruns")


class Trackers:
    """The writers of one run on rank 0; `log` takes a metrics record with a `step`."""

    def __init__(self, cfg: RaylmConfig, root: str, run_dir: str):
        tr = cfg.train.tracking
        self.tb: Optional[Any] = None
        self.mlflow: Optional[Any] = None
        if tr.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(logdir=os.path.join(run_dir, TB_DIR))
        if tr.mlflow:
            import mlflow

            uri = mlflow_uri(cfg, root)
            if uri.startswith("file://"):  # MLflow 3 keeps the file store only on request
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(tr.mlflow_experiment)
            mlflow.start_run(run_name=cfg.train.run_name, tags={"raylm.run_dir": run_dir})
            mlflow.log_params(flat_params(cfg))
            self.mlflow = mlflow

    def log(self, record: dict) -> None:
        values = {k: float(record[k]) for k in SCALARS if isinstance(record.get(k), (int, float))}
        if not values or "step" not in record:
            return
        step = int(record["step"])
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(tag(key), value, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def flat_params(cfg: RaylmConfig) -> dict[str, str]:
    """The run's data/model/train/deepspeed settings as dotted MLflow params (values as text)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)[:500]

    dumped = cfg.model_dump(mode="json")
    walk("", {k: dumped[k] for k in ("data", "model", "train", "deepspeed")})
    return out
