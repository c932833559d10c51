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
    """The writers of one run on rank 0; `log` takes a metrics record with a `step`.

    `mlflow_run_id`: the MLflow run of the checkpoint this run resumes from (its manifest keeps
    it): a restarted run goes on logging to that run rather than opening a new one."""

    def __init__(self, cfg: RaylmConfig, root: str, run_dir: str, mlflow_run_id: Optional[str] = None):
        tr = cfg.train.tracking
        self.tb: Optional[Any] = None
        self.mlflow: Optional[Any] = None
        self.mlflow_run_id: Optional[str] = None
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
            if not (mlflow_run_id and _resume_run(mlflow, mlflow_run_id)):
                mlflow.start_run(run_name=cfg.train.run_name, tags={"raylm.run_dir": run_dir})
                mlflow.log_params(flat_params(cfg))  # a resumed run keeps its first params (MLflow's are write-once)
            self.mlflow = mlflow
            self.mlflow_run_id = mlflow.active_run().info.run_id

    def ids(self) -> dict[str, str]:
        """What a checkpoint keeps so that a resume logs to the same runs."""
        return {"mlflow_run_id": self.mlflow_run_id} if self.mlflow_run_id else {}

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


def _resume_run(mlflow: Any, run_id: str) -> bool:
    """Reopen the MLflow run a checkpoint names; False (a new run starts) when the store no longer has it."""
    try:
        mlflow.start_run(run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - MlflowException: deleted, or another tracking store
        print(f"raylm: MLflow run {run_id} of the resumed checkpoint cannot be reopened ({exc}); starting a new one",
              flush=True)
        return False
    return True


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
