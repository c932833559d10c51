"""The Tune stage: a Ray Tune sweep whose trials each build and fit one `TorchTrainer`.

Ray 2.60 (Train V2) pattern: the Tuner runs `trial_fn`, a plain function holding a sliver of a
CPU, which builds the trial's TorchTrainer (DeepSpeed workers with their own resources) and
forwards its evaluation reports to Tune, so ASHA can stop a poor trial after any evaluation.

Layout under `<train.storage_path>/<tune.sweep_name>/`:

    tune/              Ray Tune's experiment (restorable: the same command resumes it)
    trials/<trial>/    each trial's Train run: metrics.jsonl and step_* checkpoints
    search_space.json  the search space the sweep started with (a rerun with another one is refused)
    best.json          the best checkpoint of the best trial, by the metric measured at its step
                       (what `raylm serve` reads)
    trials.md          the table of trials; val_loss.png: validation-loss curves of all trials
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from raylm import console, storage
from raylm.config import ConfigError, RaylmConfig, validate_tree
from raylm.console import Progress, say

SPEC_KINDS = ("loguniform", "uniform", "choice", "grid")
# What each train.objective reports at its evaluations (what a sweep can rank trials by)
OBJECTIVE_METRICS = {"lm": ("val_loss", "perplexity", "loss"),
                     "dpo": ("val_rewards/accuracy", "val_rewards/margins", "val_loss", "loss"),
                     "grpo": ("val_rewards/mean", "loss")}
METRICS = tuple(dict.fromkeys(m for ms in OBJECTIVE_METRICS.values() for m in ms))
FIXED_BY_SWEEP = ("train.storage_path", "train.run_name")
TRIAL_CPU = 0.01  # the trial function only drives its TorchTrainer (carved out of its workers' CPUs)
SPACE_FILE = "search_space.json"  # in the sweep folder: the space it was started with
KUBERAY_ENV = "KUBERAY_GEN_RAY_START_CMD"  # set by the KubeRay operator in every Ray container it starts


# ------------------------------------------------------------------ validation (before Ray)


def _set_dotted(tree: dict, dotted: str, value: Any) -> dict:
    tree = copy.deepcopy(tree)
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return tree


def _has_path(tree: dict, dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return not isinstance(node, dict)


def _spec_values(key: str, spec: Any) -> tuple[str, list]:
    """(kind, the values to check) for one search-space entry; raises naming the entry."""
    where = f"tune.search_space.{key}"
    if not isinstance(spec, dict):
        return "constant", [spec]
    if len(spec) != 1 or next(iter(spec)) not in SPEC_KINDS:
        raise ConfigError(f"{where}: expected one of {{{' | '.join(k + ': ...' for k in SPEC_KINDS)}}}, got {spec}")
    kind, values = next(iter(spec.items()))
    if kind in ("loguniform", "uniform"):
        if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                and values[0] < values[1]):
            raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values}")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {values[0]}")
    elif not (isinstance(values, list) and values):
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values}")
    return kind, list(values)


def validate_sweep(cfg: RaylmConfig) -> None:
    """Reject a sweep that cannot run, naming the field, before any cluster resource is asked for.

    Every bound and choice is checked against the typed config, so a value no trial could use
    (a negative learning rate, an unknown field) is an error now rather than N failed trials.
    A value that is valid but fails at run time (a batch the data cannot fill) is left to its
    trial, which is then recorded as failed while the others go on.
    """
    t = cfg.tune
    if not t.search_space:
        raise ConfigError("tune.search_space: empty; name at least one field, e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    if t.metric not in METRICS:
        raise ConfigError(f"tune.metric: {t.metric!r} is not reported by training; use one of {', '.join(METRICS)}")
    reported = OBJECTIVE_METRICS[cfg.train.objective]
    if t.metric not in reported:
        raise ConfigError(f"tune.metric: {t.metric!r} is not reported with train.objective={cfg.train.objective} "
                          f"({', '.join(reported)})")
    base = cfg.model_dump(mode="json")
    kinds = []
    for key, spec in t.search_space.items():
        if key.startswith("tune.") or key in FIXED_BY_SWEEP:
            raise ConfigError(f"tune.search_space.{key}: cannot be swept (the sweep sets it per trial)")
        if not _has_path(base, key):
            raise ConfigError(f"tune.search_space.{key}: no such config field (`raylm config` lists them)")
        kind, values = _spec_values(key, spec)
        kinds.append(kind)
        for value in values:
            try:
                validate_tree(_set_dotted(base, key, value), source=f"tune.search_space.{key}={value!r}")
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: value {value!r} is invalid:\n{exc}") from None
    _validate_data_entries(cfg)
    if t.search_alg != "random" and "grid" in kinds:
        raise ConfigError(f"tune.search_alg={t.search_alg}: grid entries need search_alg: random")
    if t.search_alg == "hyperopt":
        try:
            import hyperopt  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search_alg=hyperopt: the hyperopt package is not installed "
                              "(pip install hyperopt, or use optuna)") from None
    if cfg.train.num_workers * cfg.train.cpus_per_worker <= TRIAL_CPU:
        raise ConfigError(f"train.cpus_per_worker={cfg.train.cpus_per_worker}: a trial's workers must hold more "
                          f"than the {TRIAL_CPU} CPU its trial function takes from them")
    if t.scheduler == "asha" and t.asha.grace_period > evals_per_trial(cfg):
        raise ConfigError(f"tune.asha.grace_period={t.asha.grace_period}: a trial only evaluates "
                          f"{evals_per_trial(cfg)} times (train.max_steps / train.eval_every_steps)")


MAX_DATA_CONFIGS = 16


def _validate_data_entries(cfg: RaylmConfig) -> None:
    """`data.*` entries: each distinct data config is built once, before the trials, into its own
    cache; so only a finite list of values can work (choice, grid, a constant), each must resolve."""
    from raylm.data import DataError

    for key, spec in _data_entries(cfg).items():
        kind, _ = _spec_values(key, spec)
        if kind in ("loguniform", "uniform"):
            raise ConfigError(f"tune.search_space.{key}: a data setting needs a list of values (choice or grid): "
                              f"each is built once, before the trials, into its own data cache")
    combos = data_combinations(cfg)
    if len(combos) > MAX_DATA_CONFIGS:
        raise ConfigError(f"tune.search_space: {len(combos)} distinct data configs (more than {MAX_DATA_CONFIGS}); "
                          f"each is tokenized into its own cache: sweep fewer data.* values")
    for combo in combos:
        try:
            from raylm.data import resolve_source

            resolve_source(_data_config(cfg, combo))
        except DataError as exc:
            key = next((k for k in combo if k == "data.source"), next(iter(combo), "data.source"))
            raise ConfigError(f"tune.search_space.{key}: {exc}") from None


def _data_entries(cfg: RaylmConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.tune.search_space.items() if k.startswith("data.")}


def sweeps_data(cfg: RaylmConfig) -> bool:
    """Whether the search space has data.* entries: then the base config's data is not what the
    trials train on, and `sweep_data` prepares each distinct data config instead."""
    return bool(_data_entries(cfg))


def data_combinations(cfg: RaylmConfig) -> list[dict[str, Any]]:
    """Every distinct assignment of the sweep's data.* entries ([{}] when there is none)."""
    import itertools

    entries = {k: _spec_values(k, spec)[1] for k, spec in _data_entries(cfg).items()}
    return [dict(zip(entries, values)) for values in itertools.product(*entries.values())]


def _data_config(cfg: RaylmConfig, combo: dict[str, Any]) -> Any:
    tree = cfg.model_dump(mode="json")
    for key, value in combo.items():
        tree = _set_dotted(tree, key, value)
    return validate_tree(tree, source=f"tune.search_space {combo}").data


def data_key(params: dict[str, Any]) -> str:
    """Which prepared data a trial uses: its data.* values."""
    import json

    return json.dumps({k: v for k, v in sorted(params.items()) if k.startswith("data.")}, default=str)


def sweep_data(cfg: RaylmConfig, prepared: Any = None) -> dict[str, Any]:
    """The packed-token cache of each distinct data config of the sweep, built once (not once per
    trial) before any trial starts; said, so the sweep's log shows it."""
    from raylm.data import prepare_data

    out: dict[str, Any] = {}
    for combo in data_combinations(cfg):
        if not combo and prepared is not None:
            out[data_key(combo)] = prepared
            continue
        data = prepare_data(_data_config(cfg, combo), verbose=False, storage_path=cfg.train.storage_path)
        out[data_key(combo)] = data
        say(f"sweep data {' '.join(f'{k}={v}' for k, v in combo.items()) or '(base)'}: {data.reuse_line()}",
            event="sweep_data", params=combo, uri=data.uri, built=data.built)
    say(f"sweep data: {len(out)} data cache(s), prepared once before the trials; every trial trains on one of them "
        f"and tokenizes nothing", event="sweep_data_ready", caches=sorted({d.uri for d in out.values()}))
    return out


def evals_per_trial(cfg: RaylmConfig) -> int:
    """Evaluations in a full trial: every eval_every_steps, plus one at the final step."""
    t = cfg.train
    return t.max_steps // t.eval_every_steps + (1 if t.max_steps % t.eval_every_steps else 0)


# ------------------------------------------------------------------ search space and trials


def param_space(cfg: RaylmConfig) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {}
    for key, spec in cfg.tune.search_space.items():
        kind, values = _spec_values(key, spec)
        space[key] = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
                      "choice": tune.choice, "grid": tune.grid_search, "constant": lambda v: v[0]}[kind](values)
    return space


def trial_config(base_tree: dict, params: dict[str, Any], trials_dir: str, trial_id: str) -> RaylmConfig:
    """The base config with this trial's sampled values, writing under trials/<trial_id>."""
    tree = copy.deepcopy(base_tree)
    for key, value in params.items():
        tree = _set_dotted(tree, key, value)
    tree["train"]["storage_path"], tree["train"]["run_name"] = trials_dir, trial_id
    return validate_tree(tree, source=f"trial {trial_id}")


def eval_forwarder():
    """A Train callback that sends Tune one result per evaluation (what ASHA ranks trials by).

    Metrics-only reports between evaluations would make Tune iterations depend on timing;
    forwarding only reports with a new evaluation makes one Tune iteration = one evaluation.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def __init__(self):
            super().__init__()
            self._evals = 0

        def after_report(self, run_context, metrics, checkpoint):
            evals = int(metrics[0].get("evals", 0))
            if evals > self._evals:
                self._evals = evals
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def trial_fn(params: dict, base_tree: dict, trials_dir: str, prepared: dict) -> None:
    """One Tune trial: build the trial's config and fit one TorchTrainer on the data cache of its
    data settings (built before the sweep, shared by every trial with the same ones)."""
    from ray import tune

    from raylm.train.driver import build_trainer, check_data_fits

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_tree, params, trials_dir, trial_id)
    data = prepared[data_key(params)]
    check_data_fits(cfg, data)  # an impossible trial fails here: recorded, the sweep goes on
    result = build_trainer(cfg, data, callbacks=[eval_forwarder()], held_cpu=TRIAL_CPU, keep_best=True).fit()
    if result.error:
        raise result.error


def cluster_capacity(cfg: RaylmConfig) -> dict[str, float]:
    """CPUs and GPUs the cluster can grow to, not only what is up now: the autoscaler's limits
    (the node groups' max counts it publishes, which Ray Train itself checks a worker group
    against) and, on a KubeRay pod, the head plus cluster.worker_max_replicas worker pods. A
    sweep started on an autoscaling cluster with no workers up would otherwise run one trial at a
    time to the end."""
    import ray

    try:
        from ray._private.state import state

        autoscaler = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - no autoscaler config (a fixed or local cluster)
        autoscaler = {}
    return grown_capacity(cfg, ray.cluster_resources(), autoscaler, os.environ.get(KUBERAY_ENV) is not None)


def grown_capacity(cfg: RaylmConfig, now: dict, autoscaler: dict, on_kuberay: bool) -> dict[str, float]:
    """The largest of: the resources up now, the autoscaler's maximum, and (on KubeRay) the head
    pod plus cluster.worker_max_replicas worker pods of cluster.worker_cpus / worker_gpus."""
    cl = cfg.cluster
    kuberay = {"CPU": cl.head_cpus + cl.worker_max_replicas * cl.worker_cpus,
               "GPU": cl.worker_max_replicas * cl.worker_gpus} if on_kuberay else {}
    return {k: max(float(now.get(k, 0)), float(autoscaler.get(k, 0)), float(kuberay.get(k, 0))) for k in ("CPU", "GPU")}


def max_concurrency(cfg: RaylmConfig, capacity: dict[str, float]) -> int:
    """Trials that fit at once in `capacity`: every trial's workers need their CPUs (and GPUs)."""
    t = cfg.train
    fit = int(capacity.get("CPU", 1) // (t.num_workers * t.cpus_per_worker))
    if t.use_gpu:
        fit = min(fit, int(capacity.get("GPU", 0) // t.num_workers))
    limit = min(max(1, fit), cfg.tune.num_samples * max(1, grid_size(cfg)))
    return min(limit, cfg.tune.max_concurrent_trials) if cfg.tune.max_concurrent_trials else limit


def grid_size(cfg: RaylmConfig) -> int:
    """Trials per sample: the product of the grid entries' lengths (1 without grids)."""
    n = 1
    for key, spec in cfg.tune.search_space.items():
        kind, values = _spec_values(key, spec)
        n *= len(values) if kind == "grid" else 1
    return n


# ------------------------------------------------------------------ the sweep folder's search space


def space_record(cfg: RaylmConfig) -> dict:
    """What a sweep folder was started with (the search space), written before its first trial."""
    return {"search_space": cfg.tune.search_space}


def check_sweep_folder(cfg: RaylmConfig) -> None:
    """Refuse to resume a sweep whose folder was started with another search space: Tune would go on
    sampling the old one and silently ignore the edit. Runs before Ray starts."""
    sweep_dir = sweep_path(cfg)
    record = storage.join(sweep_dir, SPACE_FILE)
    if storage.kind(record) != "file":
        return
    try:
        before = storage.read_json(record).get("search_space")
    except (storage.StorageError, ValueError, AttributeError) as exc:
        raise ConfigError(f"tune.search_space: cannot read {record} ({exc})", fields=["tune.search_space"]) from None
    now = json.loads(json.dumps(cfg.tune.search_space))  # as stored: tuples become lists
    if before != now:
        changed = sorted(k for k in set(before or {}) | set(now) if (before or {}).get(k) != now.get(k))
        raise ConfigError(f"tune.search_space: differs from the one sweep {cfg.tune.sweep_name!r} in {sweep_dir} ran "
                          f"with (changed: {', '.join(changed)}); name a new sweep (--set tune.sweep_name=<new>) or "
                          f"restore the search space to resume it", fields=["tune.search_space"])


def record_search_space(cfg: RaylmConfig) -> None:
    record = storage.join(sweep_path(cfg), SPACE_FILE)
    if storage.kind(record) != "file":
        storage.write_json(record, space_record(cfg))


def build_tuner(cfg: RaylmConfig, prepared: dict) -> Any:
    """A Tuner over `trial_fn`, or the restored one when this sweep ran before (resume).
    `prepared`: the data cache of each distinct data config (`sweep_data`)."""
    from ray import tune

    t = cfg.tune
    sweep_dir = sweep_path(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base_tree=cfg.model_dump(mode="json"),
                             trials_dir=storage.trials_dir(sweep_dir), prepared=prepared),
        {"CPU": TRIAL_CPU})
    experiment = storage.tune_dir(sweep_dir)
    if tune.Tuner.can_restore(experiment):
        say(f"resuming sweep {t.sweep_name} from {experiment} (finished trials are not rerun)", event="sweep_resume")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=False)
    capacity = cluster_capacity(cfg)
    concurrency = max_concurrency(cfg, capacity)
    gpus = f", {capacity['GPU']:g} GPU" if cfg.train.use_gpu else ""
    say(f"sweep {t.sweep_name}: {t.num_samples} sample(s), up to {concurrency} trial(s) at once "
          f"({cfg.train.num_workers} workers x {cfg.train.cpus_per_worker} CPU each; the cluster can grow to "
          f"{capacity['CPU']:g} CPU{gpus}), scheduler={t.scheduler}, "
          f"search={t.search_alg}, {evals_per_trial(cfg)} evaluations per full trial", event="sweep")
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        # reuse_actors=False: a stopped trial's actor must die, taking its TorchTrainer (controller,
        # workers, placement group) with it; a reused actor kept them and the next trial starved
        tune_config=tune.TuneConfig(metric=t.metric, mode=t.mode, num_samples=t.num_samples, reuse_actors=False,
                                    scheduler=_scheduler(cfg), search_alg=_search_alg(cfg, concurrency)),
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, **quiet_run_options(cfg),
                                  failure_config=tune.FailureConfig(max_failures=t.max_trial_failures)),
    )


def quiet_run_options(cfg: RaylmConfig) -> dict[str, Any]:
    """For a quiet CLI: no Tune status tables, one progress bar of trials instead."""
    if not console.quiet():
        return {}
    return {"verbose": 0, "callbacks": [sweep_progress(cfg)]}


def sweep_progress(cfg: RaylmConfig) -> Any:
    """A Tune callback (it runs in this process) moving a bar of finished trials, with the best
    metric so far."""
    from ray import tune

    from raylm.train.policy import best

    t = cfg.tune

    class SweepProgress(tune.Callback):
        def __init__(self):
            self.bar = Progress(f"tune: {t.sweep_name}", total=t.num_samples, unit="trials")
            self.best: Optional[float] = None
            self.ended = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if isinstance(result.get(t.metric), (int, float)):
                value = float(result[t.metric])
                self.best = best([v for v in (self.best, value) if v is not None], t.mode)
                self.bar.update(self.ended, **{f"best {t.metric}": self.best, "running": trial.trial_id})

        def _end(self, trial):
            self.ended += 1
            self.bar.update(self.ended, **({f"best {t.metric}": self.best} if self.best is not None else {}))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial)

        def on_experiment_end(self, trials, **info):
            self.bar.close()

    return SweepProgress()


def _scheduler(cfg: RaylmConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    a = cfg.tune.asha
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # time = Tune iterations = evaluations (see eval_forwarder); max_t one past the last evaluation,
    # so a trial that reaches the end finishes by itself instead of being stopped at its last report
    return ASHAScheduler(time_attr="training_iteration", max_t=evals_per_trial(cfg) + 1,
                         grace_period=a.grace_period, reduction_factor=a.reduction_factor)


def _search_alg(cfg: RaylmConfig, concurrency: int) -> Any:
    """The searcher, limited to `concurrency` live trials (Tune's max_concurrent_trials is not
    applied to a searcher passed in explicitly, so the limit is set here)."""
    from ray.tune.search import ConcurrencyLimiter

    t = cfg.tune
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=t.seed), max_concurrent=concurrency)
    if t.search_alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return ConcurrencyLimiter(HyperOptSearch(random_state_seed=t.seed), max_concurrent=concurrency)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def sweep_path(cfg: RaylmConfig) -> str:
    return storage.sweep_dir(cfg.train.storage_path, cfg.tune.sweep_name)


# ------------------------------------------------------------------ results


@dataclass
class TrialRow:
    trial_id: str
    params: dict
    status: str  # finished | stopped early | failed
    steps: int
    best_value: Optional[float]
    last_value: Optional[float]
    checkpoint: Optional[str] = None  # the trial's best servable checkpoint (hf/ present), by its own evaluation
    checkpoint_step: Optional[int] = None  # its step, from its manifest
    checkpoint_value: Optional[float] = None  # the metric measured at that step (from its manifest)
    error: Optional[str] = None
    curve: list = field(default_factory=list)  # (step, metric) per evaluation


@dataclass
class SweepOutcome:
    sweep_dir: str
    metric: str
    mode: str
    trials: list[TrialRow]
    best: Optional[TrialRow]
    best_json: Optional[str]
    seconds: float

    def table(self) -> str:
        head = f"| trial | {' | '.join(self.param_names())} | best {self.metric} | last {self.metric} | steps | status |"
        rows = [head, "|" + "---|" * (len(self.param_names()) + 5)]
        for r in self.trials:
            params = " | ".join(_fmt(r.params.get(k)) for k in self.param_names())
            mark = " **best**" if self.best and r.trial_id == self.best.trial_id else ""
            rows.append(f"| {r.trial_id}{mark} | {params} | {_fmt(r.best_value)} | {_fmt(r.last_value)} | {r.steps} | "
                        f"{r.status}{': ' + r.error if r.error else ''} |")
        return "\n".join(rows)

    def param_names(self) -> list[str]:
        return sorted({k for r in self.trials for k in r.params})

    def summary(self) -> str:
        lines = [self.table(), ""]
        if self.best:
            lines += [f"best trial: {self.best.trial_id} {self.metric}={_fmt(self.best.checkpoint_value)} "
                      f"(step {self.best.checkpoint_step}) params={self.best.params}",
                      f"best checkpoint: {self.best.checkpoint}/hf",
                      f"best pointer: {self.best_json}"]
        else:
            lines.append("no trial produced a checkpoint")
        lines.append(f"sweep: {self.sweep_dir} ({self.seconds:.0f}s)")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _trial_row(result: Any, cfg: RaylmConfig, trials_dir: str) -> TrialRow:
    from raylm.train.policy import best, best_exported_checkpoint

    metric, full_steps = cfg.tune.metric, cfg.train.max_steps
    df = result.metrics_dataframe
    told_tune = [] if df is None or metric not in df else \
        [(int(s), float(v)) for s, v in zip(df["step"], df[metric]) if v == v]
    trial_id = (result.metrics or {}).get("trial_id") or os.path.basename(result.path).split("_")[1]
    params = dict(result.config or {})
    params_file = storage.join(storage.from_ray(result.path, result.filesystem), "params.json")
    if not params and storage.kind(params_file) == "file":  # a restored sweep's errored trial carries no config
        params = storage.read_json(params_file)
    run_dir = storage.join(trials_dir, trial_id)
    logged, steps = logged_curve(run_dir, metric)
    curve = sorted({**dict(told_tune), **dict(logged)}.items())
    steps = max(steps, curve[-1][0] if curve else 0)
    picked = best_exported_checkpoint(run_dir, metric, cfg.tune.mode)
    values = [v for _, v in curve]
    best_value = best(values, cfg.tune.mode)
    if result.error:
        status, error = "failed", str(result.error).strip().splitlines()[-1][:200]
    else:  # Tune records no result after its scheduler stops a trial, though the trial may run on a little
        trial_steps = params.get("train.max_steps", full_steps)
        told = told_tune[-1][0] if told_tune else steps
        status, error = ("finished" if told >= trial_steps else "stopped early"), None
    return TrialRow(trial_id=trial_id, params=params, status=status, steps=steps, best_value=best_value,
                    last_value=values[-1] if values else None, checkpoint=picked[0] if picked else None,
                    checkpoint_step=picked[1]["step"] if picked else None,
                    checkpoint_value=picked[1]["eval"][metric] if picked else None, error=error, curve=curve)


def logged_curve(run_dir: str, metric: str) -> tuple[list[tuple[int, float]], int]:
    """(step, metric) per evaluation from the Train run's own metrics.jsonl, and the newest step it
    logged. Tune's record of a trial ends where its scheduler stopped it, but the run trains on
    until the stop reaches its workers, and its checkpoints (best.json's pick) come from those
    steps too: the table and the curves must show them. After a resume, a repeated step's newest
    record wins. A run without a log (yet) gives nothing (an object-storage run uploads its log at
    checkpoints and at the end)."""
    curve: dict[int, float] = {}
    steps = 0
    for rec in storage.read_run_log(run_dir):
        if "event" in rec or not isinstance(rec.get("step"), int):
            continue
        steps = max(steps, rec["step"])
        value = rec.get(metric)  # at evaluations only (eval_s): tune.metric may be loss, in every line
        if "eval_s" in rec and isinstance(value, (int, float)) and value == value:
            curve[rec["step"]] = float(value)
    return sorted(curve.items()), steps


def pick_best(rows: list[TrialRow], mode: str) -> Optional[TrialRow]:
    """The trial whose best servable checkpoint has the best metric (a trial without one cannot be
    served): the best checkpoint of the best trial, not that trial's newest."""
    from raylm.train.policy import best

    return best([r for r in rows if r.status != "failed" and r.checkpoint_value is not None], mode,
                key=lambda r: r.checkpoint_value)


def write_reports(outcome: SweepOutcome, cfg: RaylmConfig) -> None:
    """best.json, trials.md and val_loss.png in the sweep folder."""
    from raylm.train.checkpoint import hf_dir

    d = outcome.sweep_dir
    storage.write_bytes(storage.join(d, "trials.md"), f"# sweep {cfg.tune.sweep_name}\n\n{outcome.table()}\n".encode())
    if outcome.best:
        b = outcome.best
        pointer = {"sweep": cfg.tune.sweep_name, "trial_id": b.trial_id, "params": b.params,
                   "metric": outcome.metric, "mode": outcome.mode, "value": b.checkpoint_value,
                   "step": b.checkpoint_step,
                   "checkpoint": hf_dir(b.checkpoint), "train_checkpoint": b.checkpoint,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        storage.write_json(storage.best_json(d), pointer)  # one atomic write: never half a pointer
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, f"{outcome.metric}.png")
        plot_curves(outcome, png)
        storage.upload(png, storage.join(d, f"{outcome.metric}.png"))


def plot_curves(outcome: SweepOutcome, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in outcome.trials:
        if r.curve:
            steps, values = zip(*r.curve)
            label = f"{r.trial_id} " + " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in sorted(r.params.items()))
            ax.plot(steps, values, marker="o", lw=2.5 if outcome.best and r is outcome.best else 1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(outcome.metric)
    ax.set_title(f"sweep {outcome.sweep_dir.rstrip('/').rsplit('/', 1)[-1]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(cfg: RaylmConfig, prepared: Any = None) -> SweepOutcome:
    """Prepare data (unless given), run (or resume) the sweep, write best.json and the reports."""
    from raylm.data import prepare_data

    validate_sweep(cfg)
    check_sweep_folder(cfg)
    t0 = time.perf_counter()
    record_search_space(cfg)
    if prepared is None and not _data_entries(cfg):
        prepared = prepare_data(cfg.data, storage_path=cfg.train.storage_path)
        say(prepared.stats.summary())
        say(prepared.reuse_line())
    results = build_tuner(cfg, sweep_data(cfg, prepared)).fit()
    sweep_dir = sweep_path(cfg)
    rows = sorted((_trial_row(r, cfg, storage.trials_dir(sweep_dir)) for r in results), key=lambda r: r.trial_id)
    outcome = SweepOutcome(sweep_dir=sweep_dir, metric=cfg.tune.metric, mode=cfg.tune.mode, trials=rows,
                           best=pick_best(rows, cfg.tune.mode), best_json=None, seconds=time.perf_counter() - t0)
    if outcome.best:
        outcome.best_json = storage.best_json(sweep_dir)
    write_reports(outcome, cfg)
    return outcome

