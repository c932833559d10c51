"""Tracking without Ray: the records the train loop logs come back from TensorBoard and MLflow."""

import math

import pytest

from raylm.config import load_config
from raylm.train.tracking import Trackers


def test_records_reach_tensorboard_and_mlflow(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # raylm must allow its own default store
    cfg = load_config(overrides=[f"train.storage_path={tmp_path}", "train.run_name=tracked",
                                 "train.tracking.mlflow=true", "train.lora={r: 4}"])
    run_dir = tmp_path / "tracked"
    trackers = Trackers(cfg, str(tmp_path), str(run_dir))
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 100.0 * s, "grad_norm": 0.5} for s in (1, 2, 3)]
    records.append({"step": 3, "val_loss": 1.5, "perplexity": math.exp(1.5), "evals": 1})
    records.append({"event": "resume", "step": 3})  # not a metric record: ignored
    for r in records:
        trackers.log(r)
    trackers.close()

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 5.0), (2, 2.5), (3, pytest.approx(5 / 3))]
    assert [(e.step, e.value) for e in acc.Scalars("val/val_loss")] == [(3, 1.5)]
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm", "val/perplexity"} <= set(acc.Tags()["scalars"])

    client = mlflow.tracking.MlflowClient(tracking_uri="file://" + str(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [5.0, 2.5, pytest.approx(5 / 3)]
    assert run.data.metrics["val_loss"] == 1.5
    assert run.data.params["train.lora.r"] == "4" and run.data.params["model.name"] == "tiny-llama"


def test_a_resumed_run_logs_to_the_same_mlflow_run(tmp_path, monkeypatch):
    """The run id goes into the checkpoint (Trackers.ids); the restarted run reopens that MLflow run and
    goes on logging there, keeping its first params, even after a config change a resume allows."""
    import mlflow

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    sets = [f"train.storage_path={tmp_path}", "train.run_name=again", "train.tracking.mlflow=true"]
    first = Trackers(load_config(overrides=sets), str(tmp_path), str(tmp_path / "again"))
    for s in (1, 2):
        first.log({"step": s, "loss": 3.0 - s})
    first.close()
    kept = first.ids()
    assert kept == {"mlflow_run_id": first.mlflow_run_id} and first.mlflow_run_id

    second = Trackers(load_config(overrides=sets + ["train.lr=0.5"]), str(tmp_path), str(tmp_path / "again"),
                      mlflow_run_id=kept["mlflow_run_id"])
    assert second.mlflow_run_id == first.mlflow_run_id
    second.log({"step": 3, "loss": 0.5})
    second.close()
    client = mlflow.tracking.MlflowClient(tracking_uri="file://" + str(tmp_path / "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.0), (3, 0.5)]
    assert run.data.params["train.lr"] == str(load_config().train.lr) and run.info.status == "FINISHED"

    # a store that lost the run: a new one, said
    third = Trackers(load_config(overrides=sets), str(tmp_path), str(tmp_path / "again"), mlflow_run_id="0" * 32)
    assert third.mlflow_run_id not in (None, first.mlflow_run_id)
    third.close()
