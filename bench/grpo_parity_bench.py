"""GRPO parity with TRL (issue 33 item 7): raylm's GRPO and TRL 1.16's GRPOTrainer, side by side, in
one run on the same base, prompts, reward and settings.

1. The base: 600 steps of chat SFT of the tiny preset (`configs/chat_sft.yaml` with its settings
   pinned here with --set, so later edits of that file do not move the base), reused when the
   work dir already holds it.
2. raylm: `raylm train -c configs/grpo.yaml` from the base's HF export (16 prompts a step, 8
   completions each, max_completion_length 6, beta 0.04, lr 1e-4 with 5 warmup steps and raylm's
   cosine to 0.1 x lr, weight decay 0.1, grad clip 1, loss_type dapo, temperature 1, 120 steps,
   one trainer worker and one vLLM rollout engine, max_staleness 0).
3. TRL 1.16 GRPOTrainer on CPU (transformers generate, no vLLM) from the same HF export, with the
   same settings in GRPOConfig's names (per_device_train_batch_size 128 = 16 prompts x 8, one
   generation per step, the same schedule, decay and clipping), on the same train records: raylm's
   data stage's train split read back from its dataset cache (the same 536 records; each side
   shuffles them its own way), scored by a TRL-convention reward that calls
   raylm.rewards:exact_match.
4. Both measured the same way: the mean sampled reward of steps 1-30 and 91-120 (raylm's
   metrics.jsonl `rewards/mean`, 5-step windows of equal size; TRL's log history `reward`, every
   step), and the greedy exact match of each final model (and of the base) on the validation split
   of raylm's data stage, answered by one transformers greedy-generation function for every model.

Item 10's extras from the same run: raylm's step time split (generation, sync, the trainer's rest)
from its metrics, and a second raylm run with max_staleness 1, its step time against the first's.
The raylm runs train while TRL does (the machine is shared anyway; the two raylm runs share the same
load, so their step times compare with each other, not with an idle machine's).

Goal (issue 33 item 7): raylm's rise >= TRL's rise - 0.02 and raylm's final greedy exact match >=
TRL's - 0.03. One run each: on a model this small the sampled rewards are noisy (128 completions a
step), so a miss or a pass by a few hundredths is within one run's noise.

    python bench/grpo_parity_bench.py --out bench/results/grpo-parity-<date>.json --workdir /tmp/raylm-grpoparity
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, stage_main  # noqa: E402

STEPS = 120
PROMPTS, GENERATIONS, MAX_COMPLETION = 16, 8, 6
BETA, LR, WARMUP, LOSS_TYPE = 0.04, 1e-4, 5, "dapo"
# configs/chat_sft.yaml (main at the time of writing) and tiny.yaml's train settings, pinned
BASE_SETTINGS = {
    "data.source": "configs/data/arith_chat.jsonl", "data.format": "chat", "data.vocab_size": 512,
    "data.seq_len": 128, "data.val_fraction": 0.1, "data.sft.messages_field": "messages",
    "data.sft.train_on": "assistant", "data.sft.packing": "true", "data.sft.too_long": "truncate",
    "train.max_steps": 600, "train.lr": 3.0e-3, "train.eval_every_steps": 200, "train.checkpoint_every_steps": 200,
    "train.run_name": "chat-sft600", "deepspeed.zero_stage": 2,
}


def raylm_cli(workdir: str, config: str, settings: dict, log: str) -> subprocess.Popen:
    """`raylm train` in a private HOME on a fresh local Ray cluster (started, not waited for)."""
    home = os.path.join(workdir, "home")
    os.makedirs(home, exist_ok=True)
    cmd = ["env", "-i", f"PATH={os.environ['PATH']}", f"HOME={home}", "nice", "-n", "5",
           str(REPO / ".venv" / "bin" / "raylm"), "train", "-c", config, "--address", "local"]
    for k, v in settings.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    proc.t0 = time.time()
    return proc


def finished(proc: subprocess.Popen) -> float:
    """Waits for a raylm_cli run; returns its wall seconds."""
    if proc.wait() != 0:
        raise RuntimeError(f"{proc.args[-10:]} exited {proc.returncode}")
    return time.time() - proc.t0


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def window_mean(points: list[tuple[int, float]], first: int, last: int) -> float:
    values = [v for s, v in points if first <= s <= last]
    return sum(values) / len(values)


def step_split(metrics: list[dict]) -> dict:
    """Seconds a step from raylm's metrics: the step (median over 5-step windows, so the windows
    holding an eval or a checkpoint drop out), generation (the engine's own seconds: completion
    tokens / rollout_tokens_per_s), sync (sync_s) and the rest (the trainer's reference and policy
    forward, backward and optimizer step, scoring and the loop's own work)."""
    import statistics

    windows = [m for m in metrics if "rewards/mean" in m]
    steps = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in zip(windows, windows[1:])]
    step_s = statistics.median(steps)
    gen_s = statistics.median(m["completion_length"] * PROMPTS * GENERATIONS / m["rollout_tokens_per_s"]
                              for m in windows)
    sync_s = statistics.median(m["sync_s"] for m in windows)
    return {"step_s": step_s, "generation_s": gen_s, "sync_s": sync_s, "trainer_and_rest_s": step_s - gen_s - sync_s,
            "rollout_tokens_per_s": statistics.median(m["rollout_tokens_per_s"] for m in windows)}


def cached_records(dataset_dir: str, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for part in sorted(Path(dataset_dir, split).glob("*.parquet")):
        rows += [json.loads(r) for r in pq.read_table(part, columns=["record"]).column("record").to_pylist()]
    return rows


def greedy_exact_match(model_or_path, tokenizer_path: str, records: list[dict]) -> float:
    """Greedy answers (max_completion_length new tokens) to every record's prompt, scored by
    raylm.rewards.exact_match: the same code for every model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raylm.rewards import exact_match

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    model = (AutoModelForCausalLM.from_pretrained(model_or_path) if isinstance(model_or_path, str)
             else model_or_path).eval()
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
               for r in records]
    width = max(len(p) for p in prompts)  # left-padded, one batch
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_COMPLETION,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    completions = [[{"role": "assistant", "content": tok.decode(row[width:], skip_special_tokens=True)}]
                   for row in out]
    scores = exact_match([r["prompt"] for r in records], completions, answer=[r["answer"] for r in records])
    return sum(scores) / len(scores)


def trl_reward(prompts, completions, **kwargs):
    """TRL's convention, raylm's built-in underneath."""
    from raylm.rewards import exact_match

    kwargs.pop("trainer_state", None)
    return exact_match(prompts, completions, **kwargs)


trl_reward.__name__ = "exact_match"


def run_trl(base_hf: str, train_records: list[dict], workdir: str, on_step=None) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(base_hf)
    model = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=os.path.join(workdir, "trl"), use_cpu=True, bf16=False, seed=0, report_to="none",
        per_device_train_batch_size=PROMPTS * GENERATIONS, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=GENERATIONS, max_completion_length=MAX_COMPLETION, temperature=1.0, top_p=1.0,
        beta=BETA, loss_type=LOSS_TYPE, learning_rate=LR, warmup_steps=WARMUP, max_steps=STEPS,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, weight_decay=0.1,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", use_vllm=False, dataloader_num_workers=0)
    callbacks = []
    if on_step is not None:  # called after each step until it returns True
        from transformers import TrainerCallback

        class Once(TrainerCallback):
            done = False

            def on_step_end(self, *a, **k):
                if not self.done:
                    self.done = bool(on_step() or False) or self.done

        callbacks.append(Once())
    trainer = GRPOTrainer(model=model, reward_funcs=[trl_reward], args=args, processing_class=tok,
                          train_dataset=Dataset.from_list(train_records), callbacks=callbacks)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    history = [h for h in trainer.state.log_history if "reward" in h]
    return {"model": trainer.model, "rewards": [(int(h["step"]), float(h["reward"])) for h in history],
            "seconds": seconds, "history": history}


def run(args) -> dict:
    work = Path(args.workdir)
    results = work / "home" / "raylm_results"
    base_hf = results / "chat-sft600" / "step_00000600" / "hf"
    timings = {}
    if not (base_hf / "config.json").exists():
        timings["base_s"] = finished(raylm_cli(args.workdir, "configs/chat_sft.yaml", BASE_SETTINGS,
                                               str(work / "base.log")))
    # raylm's runs (max_staleness 0, and 1 for item 10 unless --quick) beside TRL's: the machine is
    # shared, so the three share its load; the two raylm runs' step times are compared with each other
    runs = {"raylm": ("grpo-parity", 0)} if args.quick else {"raylm": ("grpo-parity", 0), "raylm staleness 1":
                                                              ("grpo-parity-k1", 1)}
    procs = {}

    def start(name: str) -> None:  # a run already under way (or done) in this work dir is waited for instead
        run_name, k = runs[name]
        if not (results / run_name / "metrics.jsonl").exists():
            procs[name] = raylm_cli(args.workdir, "configs/grpo.yaml",
                                    {"model.name": str(base_hf), "train.run_name": run_name,
                                     "train.grpo.max_staleness": k}, str(work / f"{run_name}.log"))

    def logged(run_name: str, key: str) -> list[dict]:
        path = results / run_name / "metrics.jsonl"
        return [m for m in read_metrics(results / run_name) if key in m] if path.exists() else []

    start("raylm")
    while not logged("grpo-parity", "event"):
        if "raylm" in procs and procs["raylm"].poll() not in (None, 0):
            raise RuntimeError(f"raylm's GRPO run exited {procs['raylm'].returncode}")
        time.sleep(5)
    dataset = next(m["data"] for m in logged("grpo-parity", "event") if m.get("event") == "start")
    train_records, val_records = cached_records(dataset, "train"), cached_records(dataset, "val")
    k1_started = "raylm staleness 1" not in runs

    def start_k1_when_ready() -> bool:
        if not logged("grpo-parity", "val_rewards/mean"):
            return False
        start("raylm staleness 1")
        return True

    trl = run_trl(str(base_hf), train_records, args.workdir,
                  # the staleness-1 run once the first has its engine up (two engines starting at once
                  # on the loaded machine timed a Ray node's start out)
                  on_step=None if k1_started else start_k1_when_ready)
    timings["trl_train_s"] = trl["seconds"]
    if "raylm staleness 1" in runs and "raylm staleness 1" not in procs:
        start("raylm staleness 1")
    errors = {}
    for name, (run_name, _) in runs.items():
        try:
            if name in procs:
                timings[f"{name} wall s"] = finished(procs[name])
            while not (results / run_name / f"step_{STEPS:08d}" / "hf" / "config.json").exists():
                time.sleep(5)  # started by an earlier invocation
        except RuntimeError as exc:
            if name == "raylm":
                raise
            errors[name] = str(exc)
    runs = {name: run for name, run in runs.items() if name not in errors}
    metrics = {name: read_metrics(results / run_name) for name, (run_name, _) in runs.items()}
    curves = {name: [(m["step"], m["rewards/mean"]) for m in ms if "rewards/mean" in m] for name, ms in metrics.items()}
    curves["trl"] = trl["rewards"]

    greedy = {"base": greedy_exact_match(str(base_hf), str(base_hf), val_records),
              "trl": greedy_exact_match(trl["model"], str(base_hf), val_records)}
    for name, (run_name, _) in runs.items():
        greedy[name] = greedy_exact_match(str(results / run_name / f"step_{STEPS:08d}" / "hf"), str(base_hf),
                                          val_records)
    side = {}
    for name, points in curves.items():
        first, last = window_mean(points, 1, 30), window_mean(points, STEPS - 29, STEPS)
        windows = points if name != "trl" else [  # TRL logs every step; raylm 5-step means
            (s, window_mean(points, s - 4, s)) for s in range(5, STEPS + 1, 5)]
        side[name] = {"reward_1_30": first, f"reward_{STEPS - 29}_{STEPS}": last, "rise": last - first,
                      "peak_5_step_window": max(v for _, v in windows), "greedy_exact_match": greedy[name]}
    split = {name: step_split(ms) for name, ms in metrics.items()}
    rise_ok = side["raylm"]["rise"] >= side["trl"]["rise"] - 0.02
    greedy_ok = side["raylm"]["greedy_exact_match"] >= side["trl"]["greedy_exact_match"] - 0.03
    rows = [[name, s["reward_1_30"], s[f"reward_{STEPS - 29}_{STEPS}"], s["rise"], s["greedy_exact_match"]]
            for name, s in side.items()]
    rows.append(["base (SFT 600 steps)", None, None, None, greedy["base"]])
    return {"title": "GRPO parity with TRL 1.16 (issue 33 item 7)",
            "note": __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "tables": [{"name": f"{STEPS} steps, {PROMPTS} prompts x {GENERATIONS}, same base; greedy exact match on "
                                f"{len(val_records)} val prompts",
                        "columns": ["run", "mean reward 1-30", f"mean reward {STEPS - 29}-{STEPS}", "rise",
                                    "greedy exact match"], "rows": rows}],
            "step_split": split,
            "goals": [{"goal": "raylm rise >= TRL rise - 0.02", "met": rise_ok},
                      {"goal": "raylm greedy exact match >= TRL's - 0.03", "met": greedy_ok}],
            "raw": {"side": side, "greedy": greedy, "timings": timings, "train_records": len(train_records),
                    "val_records": len(val_records), "dataset": dataset,
                    "reward_curves": curves, "raylm_metrics": metrics,
                    "trl_history": trl["history"], "errors": errors}}


if __name__ == "__main__":
    stage_main(run)
