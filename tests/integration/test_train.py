"""The training stage on a real local Ray: DeepSpeed ZeRO 1/2/3 over CPU workers (gloo): 2 for
ZeRO-2 and -3, 3 (an odd count) for ZeRO-1, and 1 for the bf16 run (a single-GPU user's case).

Each run trains the tiny Llama preset on tinyshakespeare. What is asserted is read back from
what the run left behind (metrics.jsonl, checkpoints, the Ray Train result), not from the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.data import CacheStream, prepare_data
from raylm.train.checkpoint import verify_checkpoint
from raylm.train.deepspeed import lr_factor
from raylm.train.driver import build_trainer, check_data_fits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shakespeare_prepared(ray_cluster, shakespeare, cache_dir):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={shakespeare}", f"data.cache_dir={cache_dir}",
                                                       "data.vocab_size=512", "data.seq_len=64"])
    return prepare_data(cfg.data, verbose=False)


def train_config(tmp_path: Path, run_name: str, **fields):
    """configs/tiny.yaml on tinyshakespeare with every metric logged; `fields` are dotted overrides."""
    over = {"data.vocab_size": 512, "data.seq_len": 64, "train.storage_path": str(tmp_path),
            "train.run_name": run_name, "train.log_every_steps": 1, "train.warmup_steps": 5, **fields}
    return load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def read_log(cfg) -> list[dict]:
    path = Path(cfg.train.storage_path) / cfg.train.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def scheduled_lr(cfg, step: int) -> float:
    """The lr step `step` (1-based) trains with in an uninterrupted run of `cfg`."""
    return cfg.train.lr * lr_factor(step - 1, cfg.train)


def fit(cfg, prepared):
    check_data_fits(cfg, prepared)
    return build_trainer(cfg, prepared).fit()


_runs: dict[int, tuple] = {}


ZERO_WORKERS = {1: 3, 2: 2, 3: 2}  # ZeRO-1 over an odd count: every rank gets data, every step runs


def zero_run(stage: int, tmp_path_factory, prepared):
    """One 60-step run per ZeRO stage, shared by the tests that read it."""
    if stage not in _runs:
        cfg = train_config(tmp_path_factory.mktemp(f"zero{stage}"), f"zero{stage}", **{
            "deepspeed.zero_stage": stage, "train.max_steps": 60, "train.eval_every_steps": 30,
            "train.checkpoint_every_steps": 30, "train.num_workers": ZERO_WORKERS[stage]})
        _runs[stage] = (cfg, fit(cfg, prepared))
    return _runs[stage]


# ZeRO-2 is tiny.yaml's stage, which most of the suite's runs train with; its own 60-step run here is
# opt-in (RAYLM_EXTENDED=1): the assertions below do not depend on the stage.
@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.extended), 3])
def test_zero_stage_trains_and_loss_falls(stage, tmp_path_factory, shakespeare_prepared):
    cfg, result = zero_run(stage, tmp_path_factory, shakespeare_prepared)
    assert result.error is None
    log = [r for r in read_log(cfg) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 61))  # every step logged, none twice
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-5:]])
    assert abs(first - np.log(512)) < 0.5  # starts near uniform over the vocabulary
    assert last < first - 1.0, f"ZeRO-{stage}: loss {first:.3f} -> {last:.3f}"
    assert result.metrics["step"] == 60 and result.metrics["val_loss"] < first - 1.0
    assert result.metrics["perplexity"] == pytest.approx(np.exp(result.metrics["val_loss"]), rel=1e-6)
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["grad_norm"]) and r["skipped_steps"] == 0 for r in log)
    # warm-up starts above 0: step 1 at lr / (warmup_steps + 1), then the schedule step by step
    assert log[0]["lr"] == pytest.approx(cfg.train.lr / (cfg.train.warmup_steps + 1))
    assert [r["lr"] for r in log] == pytest.approx([scheduled_lr(cfg, r["step"]) for r in log])
    # keep_checkpoints=2: steps 30 and 60, each complete (manifest verifies)
    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000030", "step_00000060"]
    manifest = verify_checkpoint(result.checkpoint.path)
    workers = cfg.train.num_workers
    assert (manifest["step"], manifest["zero_stage"], manifest["world_size"]) == (60, stage, workers)
    t = cfg.train  # every rank trained every step on a full micro-batch
    assert result.metrics["tokens"] == 60 * t.micro_batch_size * t.grad_accum_steps * workers * cfg.data.seq_len
    # a cluster raylm started (init_ray, as the session's) is one machine: no run of it started Ray
    # Train's PreemptionWatcher (raylm.cluster.PREEMPTION_WATCHER_ENV), here or in any earlier module
    import ray
    from ray.util.state import list_actors

    address = "http://" + ray._private.worker._global_node.webui_url
    controllers = list_actors(address=address, filters=[("class_name", "=", "TrainController")], limit=10000)
    watchers = list_actors(address=address, filters=[("class_name", "=", "PreemptionWatcher")], limit=10000)
    assert controllers and not watchers, (len(controllers), len(watchers))


def test_zero3_builds_the_model_partitioned(ray_cluster, tmp_path):
    """Under ZeRO-3 raylm's build path (build_model with the run's DeepSpeed dict, as the training
    loop calls it) returns a model already partitioned over a real 2-rank group: every parameter
    is a DeepSpeed one with nothing held whole, each rank holds half of the elements, and the
    counts raylm prints (plain and with LoRA) are those of the unpartitioned model."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.cluster import worker_env
    from raylm.config import LoraConfig
    from raylm.model import build_model, count_params
    from raylm.train.lora import apply_lora, param_counts

    cfg = train_config(tmp_path, "zero3-build", **{"deepspeed.zero_stage": 3})
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])

    def per_worker(config: dict) -> None:
        import torch.distributed as dist
        from transformers.integrations import is_deepspeed_zero3_enabled

        from raylm.config import RaylmConfig
        from raylm.train.deepspeed import deepspeed_config, import_deepspeed

        deepspeed = import_deepspeed()  # as training imports it (no shm op build)

        run = RaylmConfig.model_validate(config["config"])
        deepspeed.init_distributed(dist_backend="gloo")
        model = build_model(run.model, 512, run.data.seq_len, ds_config=deepspeed_config(run))
        params = list(model.parameters())
        facts = {"deepspeed_params": sum(hasattr(p, "ds_id") for p in params), "params": len(params),
                 "held_whole": sum(p.numel() for p in params), "local": sum(p.ds_tensor.numel() for p in params),
                 "counts": param_counts(model), "zero3_flag_after": is_deepspeed_zero3_enabled(),
                 "lora_counts": param_counts(apply_lora(model, LoraConfig.model_validate(config["lora"])))}
        with open(os.path.join(config["out"], f"rank{dist.get_rank()}.json"), "w") as f:
            json.dump(facts, f)

    trainer = TorchTrainer(
        per_worker, train_loop_config={"config": cfg.model_dump(mode="json"), "lora": lora.model_dump(),
                                       "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="zero3-build", storage_path=str(tmp_path / "ray"),
                             worker_runtime_env={"env_vars": worker_env(False)}))
    assert trainer.fit().error is None
    facts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = build_model(cfg.model, 512, cfg.data.seq_len)  # the same model, built whole here
    total, n_params = count_params(whole), len(list(whole.parameters()))
    lora_counts = param_counts(apply_lora(whole, lora))
    for f in facts:
        assert f["deepspeed_params"] == f["params"] == n_params
        assert f["held_whole"] == 0 and not f["zero3_flag_after"]
        assert f["local"] == pytest.approx(total / 2, abs=n_params)  # each shard padded by < 1 per param
        assert tuple(f["counts"]) == (total, total)
        assert tuple(f["lora_counts"]) == lora_counts
    assert facts[0]["local"] + facts[1]["local"] >= total


def test_zero3_export_reproduces_trained_model(tmp_path_factory, shakespeare_prepared):
    """After ZeRO-3 (parameters sharded over both ranks) the exported HF model is the trained one:

    1. its validation loss on the blocks the workers evaluated equals the val_loss they reported;
    2. its logits equal those of a model rebuilt from DeepSpeed's own fp32 consolidation of the
       sharded state (deepspeed.utils.zero_to_fp32), an independent path to the same weights.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg, result = zero_run(3, tmp_path_factory, shakespeare_prepared)
    ckpt = result.checkpoint.path
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "hf")).eval()
    assert AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf")).eos_token_id is not None
    assert (Path(ckpt) / "hf" / "model.safetensors").is_file() and (Path(ckpt) / "hf" / "raylm_config.yaml").is_file()

    # 1. the workers' final val_loss: each rank's first eval_batches x grad_accum_steps micro-batches of its val stream
    t = cfg.train
    losses, count = 0.0, 0
    with torch.no_grad():
        for rank in range(t.num_workers):
            val = CacheStream(shakespeare_prepared.uri, shakespeare_prepared.manifest, "val", rank, t.num_workers)
            for _, batch in zip(range(t.eval_batches * t.grad_accum_steps), val.val_batches(t.micro_batch_size)):
                block = torch.tensor(batch["input_ids"], dtype=torch.long)
                logits = hf(input_ids=block[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1))
                losses += float(loss) * len(block)
                count += len(block)
    assert losses / count == pytest.approx(result.metrics["val_loss"], abs=1e-4)

    # 2. DeepSpeed's consolidation of the ZeRO-3 shards gives the same logits
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "deepspeed"), tag="state")
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(ckpt, "hf")))
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    rebuilt.tie_weights()
    rebuilt.eval()
    probe = torch.tensor(np.stack([np.asarray(r["input_ids"][:-1]) for r in shakespeare_prepared.val.take(4)]), dtype=torch.long)
    with torch.no_grad():
        a, b = hf(input_ids=probe).logits, rebuilt(input_ids=probe).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and the training moved the weights: a fresh init gives different logits
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(ckpt, "hf"))).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=probe).logits, a, atol=1e-2)


def test_bf16_cpu_run_on_one_worker_accumulates_in_fp32_and_learns(tmp_path, shakespeare_prepared):
    """bf16 on CPU (DeepSpeed's CPU accelerator) on one worker, as a single-GPU user runs it, 2
    micro-batches per step, no warm-up: the loss falls, and the DeepSpeed config the run saved
    with its checkpoint accumulates in fp32."""
    cfg = train_config(tmp_path, "bf16", **{"deepspeed.precision": "bf16", "deepspeed.zero_stage": 2,
                                            "train.grad_accum_steps": 2, "train.micro_batch_size": 2,
                                            "train.warmup_steps": 0, "train.max_steps": 30, "train.num_workers": 1,
                                            "train.eval_every_steps": 30, "train.checkpoint_every_steps": 30})
    result = fit(cfg, shakespeare_prepared)
    assert result.error is None and result.metrics["step"] == 30
    assert result.metrics["tokens"] == 30 * 2 * 2 * cfg.data.seq_len and np.isfinite(result.metrics["val_loss"])
    assert verify_checkpoint(result.checkpoint.path)["world_size"] == 1
    log = [r for r in read_log(cfg) if "loss" in r]
    assert log[0]["lr"] == cfg.train.lr  # warmup_steps 0: the first step at the peak
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-5:]])
    assert last < first - 0.5, f"bf16: loss {first:.3f} -> {last:.3f}"  # 30 small steps: ~1.0 measured
    states = torch.load(Path(result.checkpoint.path) / "deepspeed" / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False)
    ds_config = states["ds_config"]
    assert ds_config["bf16"]["enabled"] and ds_config["data_types"]["grad_accum_dtype"] == "fp32"


def strip_export(src: str, dst: Path) -> Path:
    """A copy of a checkpoint as train.export: final_and_best leaves a periodic one: no hf/ or
    adapter/, and a manifest that does not list them."""
    import shutil

    from raylm.train.checkpoint import MANIFEST

    shutil.copytree(src, dst)
    for sub in ("hf", "adapter"):
        shutil.rmtree(dst / sub, ignore_errors=True)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if not k.startswith(("hf/", "adapter/"))}
    manifest["exported"] = False
    (dst / MANIFEST).write_text(json.dumps(manifest))
    return dst


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-6, msg=name)


def test_only_the_final_checkpoint_is_exported_and_raylm_export_reproduces_it(tmp_path, tmp_path_factory,
                                                                             shakespeare_prepared):
    """train.export: final_and_best (the default): the periodic ZeRO-3 checkpoint holds the
    resumable state only; `raylm export` (DeepSpeed's ZeRO-to-fp32 merge of the rank shards, no
    engine) rebuilds an hf/ export equal to the one training wrote at the final step."""
    from transformers import AutoModelForCausalLM

    from raylm.cli import main

    cfg, result = zero_run(3, tmp_path_factory, shakespeare_prepared)
    run = Path(cfg.train.storage_path) / cfg.train.run_name
    periodic, final = verify_checkpoint(str(run / "step_00000030")), verify_checkpoint(result.checkpoint.path)
    assert not periodic["exported"] and not any(f.startswith("hf/") for f in periodic["files"])
    assert not (run / "step_00000030" / "hf").exists() and "tokenizer/tokenizer.json" in periodic["files"]
    assert final["exported"] and final["eval"]["val_loss"] == pytest.approx(result.metrics["val_loss"])

    copy = strip_export(result.checkpoint.path, tmp_path / "step_00000060")
    assert main(["export", str(copy)]) == 0
    manifest = verify_checkpoint(str(copy))  # the export is listed, with its sizes
    assert manifest["exported"] and "hf/model.safetensors" in manifest["files"]
    assert_same_weights(copy / "hf" / "model.safetensors", Path(result.checkpoint.path) / "hf" / "model.safetensors")
    # the periodic checkpoint exports too, into a model that loads and differs from the final one
    older = strip_export(str(run / "step_00000030"), tmp_path / "step_00000030")
    assert main(["export", str(older)]) == 0
    model = AutoModelForCausalLM.from_pretrained(older / "hf")
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(copy / "hf").config.vocab_size
    assert main(["export", str(older)]) == 0  # a second export is a no-op


def test_export_of_a_cut_off_checkpoint_exits_2_naming_it(tmp_path, tmp_path_factory, shakespeare_prepared):
    from raylm.cli import main
    from raylm.train.checkpoint import MANIFEST

    cfg, result = zero_run(3, tmp_path_factory, shakespeare_prepared)
    copy = strip_export(result.checkpoint.path, tmp_path / "cut")
    (copy / MANIFEST).unlink()
    assert main(["export", str(copy)]) == 2
    assert not (copy / "hf").exists()
