"""`raylm <verb>`: one function per verb. Every verb loads and validates the config first, so a
bad config exits 2 before Ray is started or any cluster resource is requested."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from raylm import console, storage
from raylm.config import InputError, RaylmConfig, dump_config, load_config
from raylm.console import print_header, say

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM during a rollout (128 + SIGINT, as shells report it)


# ------------------------------------------------------------------ verbs


def cmd_config(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Print the fully resolved config (defaults, base files and --set overrides applied)."""
    print(dump_config(cfg), end="")
    return 0


def cmd_data(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Build the packed-token cache with Ray Data (or find it complete: then Ray is not even
    started) and print documents, tokens, blocks, time, and whether it was built or reused."""
    from raylm.cluster import init_ray
    from raylm.data import cached_data, check_tokenizer_fits, resolve_source, stats_dict
    from raylm.pipeline import prepare_data_with_progress

    src = resolve_source(cfg.data)  # a missing path fails here, before Ray starts
    check_tokenizer_fits(cfg)  # ... and a tokenizer whose ids the pretrained model has no embedding for
    print_header("data", cfg)
    say(f"source: {src.kind} {src.name or ''}{len(src.paths)} path(s)")
    prepared = cached_data(cfg.data, cfg.train.storage_path)
    if prepared is None:
        init_ray(cfg, address=args.address)
        prepared = prepare_data_with_progress(cfg)
    else:
        say(prepared.reuse_line(), event="data_cache", uri=prepared.uri, built=False, build_s=prepared.build_s,
            seconds=prepared.stats.seconds)
    say(f"tokenizer: {prepared.tokenizer_dir}", event="data", **stats_dict(prepared.stats),
        summary=prepared.stats.summary(), tokenizer=prepared.tokenizer_dir)
    return 0


def cmd_train(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Train with Ray Train + DeepSpeed; resumes the run of the same name from its newest checkpoint."""
    from raylm.cluster import init_ray
    from raylm.data import check_tokenizer_fits, fingerprint, resolve_source
    from raylm.pipeline import prepare_data_with_progress
    from raylm.train.driver import check_objective_runs, check_resumable, run_training
    from raylm.train.identity import run_identity

    check_objective_runs(cfg)
    src = resolve_source(cfg.data)
    check_tokenizer_fits(cfg)
    storage.check_writable(storage.root(cfg.train.storage_path))  # bucket, credentials, endpoint: before Ray
    check_resumable(cfg, run_identity(cfg, fingerprint(cfg.data, src)))  # a resume that changed the run: exit 2
    print_header("train", cfg)
    init_ray(cfg, address=args.address)
    outcome = run_training(cfg, prepare_data_with_progress(cfg))
    say(outcome.summary(), event="trained", run_dir=outcome.run_dir, checkpoint=outcome.hf_checkpoint,
        metrics=outcome.metrics)
    return 0


def cmd_tune(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Sweep the search space in `tune:` with Ray Tune (+ ASHA); writes best.json and a trials table."""
    from raylm.cluster import init_ray
    from raylm.data import check_tokenizer_fits, resolve_source
    from raylm.pipeline import prepare_data_with_progress
    from raylm.tune import check_sweep_folder, run_sweep, sweeps_data, validate_sweep

    validate_sweep(cfg)
    resolve_source(cfg.data)
    check_tokenizer_fits(cfg)
    storage.check_writable(storage.root(cfg.train.storage_path))
    check_sweep_folder(cfg)  # an edited search space in an existing sweep folder: exit 2 before Ray
    print_header("tune", cfg)
    init_ray(cfg, address=args.address)
    outcome = run_sweep(cfg, None if sweeps_data(cfg) else prepare_data_with_progress(cfg))  # else: per data config
    say(outcome.summary(), event="swept", sweep_dir=outcome.sweep_dir, best_json=outcome.best_json,
        best=outcome.best.__dict__ if outcome.best else None)
    if (cfg.tune.evaluate_best or cfg.tune.evaluate_trials) and outcome.best_json:
        from raylm.evaluate import evaluate_sweep_best

        evaluate_sweep_best(cfg, outcome)
    return 0


def cmd_serve(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Serve a Hugging Face checkpoint (or a sweep's best.json) behind the OpenAI-compatible API."""
    from raylm.cluster import init_ray
    from raylm.servable import check_servable, resolve_checkpoint
    from raylm.lifecycle.rollout import run_serve

    if args.checkpoint:
        cfg.serve.checkpoint = args.checkpoint
    checkpoint = resolve_checkpoint(cfg.serve.checkpoint)  # fails before Ray on a bad path ...
    check_servable(checkpoint, cfg.serve)  # ... or a model, adapter or engine argument vLLM would refuse
    init_ray(cfg, address=args.address)
    return run_serve(cfg, checkpoint, blocking=not args.detach, overrides=args.set)


def cmd_promote(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (or best.json) against the served model and roll it into the live endpoint
    if it is at least as good (serve.promote); --adapter NAME adds a LoRA adapter without a redeploy.

    The new replicas start beside the old ones where the cluster has room; else replica by replica
    (2+ replicas), and a one-replica endpoint needs --allow-gap (it stops before the new one starts)."""
    from raylm.lifecycle import adapters, eval_gate, history, rollout
    from raylm.servable import check_servable, resolve_checkpoint

    if args.remove_adapter:
        entry = adapters.remove_adapter(cfg, args.remove_adapter)
        say(f"recorded in {history.history_uri(cfg)}", event="promoted", entry=entry)
        return 0
    if args.finish or args.abort:
        return _end_canary(cfg, args)
    if not args.checkpoint:
        raise InputError("promote: name the checkpoint (or best.json) to promote, or --remove-adapter NAME")
    if args.adapter:
        entry = adapters.add_adapter(cfg, args.adapter, args.checkpoint)
        say(f"recorded in {history.history_uri(cfg)}", event="promoted", entry=entry)
        return 0
    if args.canary is not None and not 0 < args.canary < 100:
        raise InputError(f"--canary {args.canary:g}: the candidate's share of requests, in percent, must lie in (0, 100)")
    candidate = resolve_checkpoint(args.checkpoint)  # a missing or corrupt checkpoint: exit 2, before Ray
    check_servable(candidate, cfg.serve)
    from raylm.cluster import init_ray
    from raylm.lifecycle.record import deployment

    deployment(cfg, args.set, args.reconfigure)  # serve settings that differ from the deployed ones: exit 2, before Ray
    init_ray(cfg, address=args.address)
    try:
        if args.canary is not None:
            from raylm.lifecycle import canary

            entry = canary.start(cfg, candidate, args.canary, force=args.force, overrides=args.set,
                                 reconfigure=args.reconfigure)
        else:
            entry = rollout.promote(cfg, candidate, force=args.force, overrides=args.set,
                                    reconfigure=args.reconfigure, allow_gap=args.allow_gap)
    except eval_gate.PromotionRefused as exc:
        console.error(str(exc))
        return eval_gate.EXIT_REFUSED
    except KeyboardInterrupt:  # recorded in the history as interrupted (rollout.change_model)
        return EXIT_INTERRUPTED
    if entry.get("action") == "promote":
        say(f"{entry['version']} is live: {entry['checkpoint']} (history: {history.history_uri(cfg)})",
            event="promoted", entry=entry)
    elif entry.get("action") == "canary_abort":
        say(f"canary {entry['version']} rolled back: {entry['reason']}", event="canary_aborted", entry=entry)
        return eval_gate.EXIT_REFUSED
    return 0


def _end_canary(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """`raylm promote --finish` / `--abort`: end the running canary."""
    from raylm.cluster import init_ray
    from raylm.lifecycle import canary, history

    if args.finish and args.abort or args.checkpoint or args.canary is not None:
        raise InputError("promote --finish and --abort end the running canary: give neither a checkpoint, --canary, "
                         "nor both")
    canary._current(cfg)  # no canary running: exit 2 before Ray
    init_ray(cfg, address=args.address)
    try:
        entry = canary.finish(cfg) if args.finish else canary.abort(cfg)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if args.finish:
        say(f"{entry['version']} is live: {entry['checkpoint']} (canary finished; history: "
            f"{history.history_uri(cfg)})", event="promoted", entry=entry)
    else:
        say(f"canary {entry['version']} removed; {entry['live_version']} serves every request", event="canary_aborted",
            entry=entry)
    return 0


def cmd_rollback(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Roll the model served before the live one back into the endpoint (zero downtime, no gate).

    A one-replica endpoint on a cluster without room for a second copy needs --allow-gap (it stops
    before the new one starts); 2+ replicas go replica by replica."""
    from raylm.cluster import init_ray
    from raylm.lifecycle import rollout

    rollout.require_live(cfg)  # nothing to roll back: exit 2 before Ray
    init_ray(cfg, address=args.address)
    try:
        entry = rollout.rollback(cfg, allow_gap=args.allow_gap)
    except KeyboardInterrupt:  # recorded in the history as interrupted
        return EXIT_INTERRUPTED
    say(f"{entry['version']} is live again: {entry['checkpoint']}", event="rolled_back", entry=entry)
    return 0


def cmd_export(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Add the Hugging Face export (hf/, with LoRA adapter/) to a checkpoint saved without it, from its
    DeepSpeed state (DeepSpeed's ZeRO-to-fp32 conversion; no Ray, no engine)."""
    from raylm.train.export import export_checkpoint

    path = args.checkpoint if storage.is_remote(args.checkpoint) else os.path.abspath(os.path.expanduser(args.checkpoint))
    hf = export_checkpoint(path, log=say)
    say(f"serve it with: raylm serve --checkpoint {hf}", event="exported", checkpoint=hf)
    return 0


def cmd_eval(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Evaluate a checkpoint offline with vLLM over Ray Data: validation loss and perplexity, and for
    chat / instruction data exact match and contains on held-out examples; writes eval.json beside it."""
    from raylm.cluster import init_ray
    from raylm.data import resolve_source
    from raylm.evaluate import check_adapter, evaluate_checkpoint, resolve_eval_checkpoint, summary

    if args.against and (args.adapter or args.no_write):
        raise InputError("raylm eval --against runs the promotion gate: it takes no --adapter or --no-write")
    checkpoint = resolve_eval_checkpoint(args.checkpoint)  # a bad path exits 2 before Ray starts
    if args.adapter:
        check_adapter(args.adapter)
    served = resolve_eval_checkpoint(args.against) if args.against else None
    resolve_source(cfg.data)
    print_header("eval", cfg)
    init_ray(cfg, address=args.address)
    if served:
        return eval_gate_verdict(cfg, checkpoint, served)
    result = evaluate_checkpoint(cfg, checkpoint, adapter=args.adapter, write=not args.no_write)
    say(f"{checkpoint}{' + ' + result['adapter'] if result['adapter'] else ''}: {summary(result)} "
        f"in {result['eval_s']:.1f}s" + (f" -> {result['eval_json']}" if "eval_json" in result else ""),
        event="evaluated", result=result)
    return 0


def eval_gate_verdict(cfg: RaylmConfig, candidate: str, served: str) -> int:
    """`raylm eval CANDIDATE --against SERVED`: the promotion gate alone, 0 if the candidate passes
    and 3 if not (what `raylm k8s promote`'s RayJob runs before the RayService is patched)."""
    from raylm.lifecycle import eval_gate

    passed, line, metrics = eval_gate.gate(cfg, candidate, served)
    if not passed:
        console.error(f"gate refused {candidate}: {line}")
        return eval_gate.EXIT_REFUSED
    say(f"gate passed: {line}", event="gate", **metrics)
    return 0


def cmd_pipeline(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Data -> Tune sweep (DeepSpeed trials) -> serve the best checkpoint -> one real completion."""
    from raylm.pipeline import run_pipeline

    return run_pipeline(cfg, address=args.address, keep_serving=args.keep_serving)


def cmd_status(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Runs, sweeps and their best trial under the storage path, and what Serve is serving."""
    from raylm.status import show_status

    return show_status(cfg, address=args.address)


def cmd_k8s(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """Render the KubeRay RayCluster / RayJob / RayService manifests from the config; `promote
    --checkpoint DIR` renders a gated promotion of the RayService (the eval gate as a RayJob, then a
    patch of its checkpoint and version) and prints the kubectl commands."""
    from raylm import k8s

    note = console.note  # on stderr: stdout lists the files written
    if args.action == "render":
        if args.candidate or args.version or args.served:
            raise InputError("raylm k8s render takes no --checkpoint, --version or --served (those are for promote)")
        for path in k8s.render_to_dir(cfg, args.out or "k8s", config_path=args.config, note=note):
            print(path)
        return 0
    if not args.candidate:
        raise InputError("raylm k8s promote: name the checkpoint folder (or a best.json to pin) with --checkpoint")
    out = args.out or "k8s-promote"
    written = k8s.promote_to_dir(cfg, args.candidate, out, config_path=args.config, version=args.version,
                                 served=args.served, note=note)
    for path in written:
        print(path)
    script = next(p for p in written if p.endswith(".sh"))
    note(f"run it (kubectl, namespace {cfg.cluster.namespace}): bash {script}\n" +
         "\n".join(line for line in open(script).read().splitlines()[2:]))
    return 0


def cmd_keys(cfg: RaylmConfig, args: argparse.Namespace) -> int:
    """API keys in serve.api_key_hashes_path, which running replicas re-read (no redeploy): `new`
    prints a new key once and adds its hash; `revoke KEY_ID` removes it; `list` shows ids and names."""
    from raylm.serve import auth

    path = cfg.serve.api_key_hashes_path
    if not path:
        raise InputError("serve.api_key_hashes_path: not set; name the hashes file the replicas re-read "
                         "(e.g. --set serve.api_key_hashes_path=s3://bucket/raylm/key_hashes)")
    if args.action == "new":
        if args.key_id:
            raise InputError(f"raylm keys new takes no key id (got {args.key_id!r}); name the key with --name")
        key = auth.new_key()
        key_id = auth.add_key_hash(path, key, args.name or "")
        say(key, event="key_created", key=key, key_id=key_id, path=path)
        say(f"key id {key_id} added to {path}: replicas accept it within serve.api_keys_reload_s "
                      f"({cfg.serve.api_keys_reload_s:g} s). The key above is shown once; only its hash is stored.")
        return 0
    if args.action == "revoke":
        if not args.key_id:
            raise InputError("raylm keys revoke needs the key id (first 12 hex digits of the key's SHA-256; "
                             "raylm keys list shows them)")
        removed = auth.revoke_key_hash(path, args.key_id)
        say(f"revoked {len(removed)} key(s) with id {args.key_id} from {path}; replicas refuse it within "
            f"{cfg.serve.api_keys_reload_s:g} s", event="key_revoked", key_id=args.key_id, path=path)
        return 0
    for digest, name in auth.read_key_hashes(path).items():
        say(f"{auth.key_id_of_hash(digest)}  {name}".rstrip(), event="key", key_id=auth.key_id_of_hash(digest),
            name=name)
    return 0


VERBS: dict[str, Callable[[RaylmConfig, argparse.Namespace], int]] = {
    "config": cmd_config, "data": cmd_data, "train": cmd_train, "tune": cmd_tune, "serve": cmd_serve,
    "export": cmd_export, "eval": cmd_eval, "promote": cmd_promote, "rollback": cmd_rollback,
    "pipeline": cmd_pipeline, "status": cmd_status, "k8s": cmd_k8s, "keys": cmd_keys,
}


def verb_summary(fn: Callable) -> str:
    """A verb's one-line help for `raylm --help`: its docstring's first paragraph, on one line (the
    first line alone cut three verbs' descriptions mid-sentence)."""
    return " ".join((fn.__doc__ or "").strip().split("\n\n")[0].split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Train, sweep and serve language models on Ray.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, fn in VERBS.items():
        p = sub.add_parser(name, help=verb_summary(fn), description=fn.__doc__)
        p.add_argument("--config", "-c", help="YAML config (may name a `base:` config to inherit from)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field by its dotted path, e.g. --set train.max_steps=20")
        p.add_argument("--address", help="Ray address (default: cluster.address, RAY_ADDRESS, else local)")
        p.add_argument("--verbose", "-v", action="store_true",
                       help="show Ray's, DeepSpeed's and vLLM's own logs (every worker's output) and warnings")
        p.add_argument("--json", action="store_true", help="print machine-readable events, one JSON object per line")
        if name == "serve":
            p.add_argument("--checkpoint", help="HF checkpoint dir or a sweep's best.json")
            p.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
        if name == "export":
            p.add_argument("checkpoint", help="a checkpoint folder (step_*) or its URI")
        if name == "promote":
            p.add_argument("checkpoint", nargs="?",
                           help="HF checkpoint dir or a sweep's best.json (with --adapter: a peft adapter dir)")
            p.add_argument("--force", action="store_true", help="skip the eval gate")
            p.add_argument("--reconfigure", action="store_true", help="deploy this config's serve settings where "
                           "they differ from the deployed ones (else they are refused, named)")
            p.add_argument("--adapter", metavar="NAME", help="add the adapter as model <serve.model_id>:NAME instead")
            p.add_argument("--remove-adapter", metavar="NAME", help="stop serving adapter NAME (delete "
                           "serve.adapters_path/NAME) instead")
            p.add_argument("--canary", type=float, metavar="PCT", help="serve the checkpoint beside the live model with "
                           "PCT%% of conversations (split by key and conversation) until --finish or --abort, or "
                           "until serve.canary.auto decides")
            p.add_argument("--finish", action="store_true", help="put the running canary's candidate live")
            p.add_argument("--abort", action="store_true", help="remove the running canary; the live model serves all")
        if name in ("promote", "rollback"):
            p.add_argument("--allow-gap", action="store_true", help="on a cluster without room for a second copy "
                           "of a one-replica endpoint, roll out anyway: the live replica stops before the new one "
                           "starts, and the endpoint does not answer until it has (without this flag such a rollout "
                           "is refused; with 2+ replicas it goes replica by replica, no gap)")
        if name == "eval":
            p.add_argument("checkpoint", help="an hf/ folder, a step folder holding hf/, or a sweep's best.json "
                           "(local or s3://, gs://)")
            p.add_argument("--adapter", help="a peft LoRA adapter folder evaluated on top of the checkpoint")
            p.add_argument("--no-write", action="store_true", help="print the result only; write no eval.json")
            p.add_argument("--against", metavar="SERVED", help="the promotion gate alone: evaluate the served "
                           "checkpoint too and exit 3 unless this one is at least as good (serve.promote)")
        if name == "pipeline":
            p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up after the demo request")
        if name == "keys":
            p.add_argument("action", choices=["new", "revoke", "list"], help="new: make a key (printed once); "
                           "revoke KEY_ID: remove it; list: key ids and names")
            p.add_argument("key_id", nargs="?", help="revoke: the key's id (first 12 hex digits of its SHA-256)")
            p.add_argument("--name", help="new: a name stored beside the hash (who the key is for)")
        if name == "k8s":
            p.add_argument("action", choices=["render", "promote"], help="render: the manifests; promote "
                           "CHECKPOINT: the gate's RayJob and the RayService patch, with the kubectl commands")
            p.add_argument("--checkpoint", dest="candidate", help="promote: the checkpoint folder to roll out, or a "
                           "best.json readable here (pinned to the folder it names)")
            p.add_argument("--version", help="promote: the model version responses name (default: ckpt-<hash>)")
            p.add_argument("--served", help="promote: the served checkpoint the gate compares against (default: "
                           "serve.checkpoint, else the sweep's best)")
            p.add_argument("--out", help="output folder (default: k8s/ for render, k8s-promote/ for promote)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # under `ray job submit` the job's log is where people look: it keeps everything, as with -v
    verbose = args.verbose or (bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")) and not args.json)
    # `raylm ...` (argv None) keeps quiet to its exit; a caller passing argv gets its process back
    with console.session(args.verb, verbose=verbose, json_events=args.json, restore=argv is not None):
        try:
            if args.verb == "pipeline" and not args.config:
                from raylm.pipeline import DEFAULT_SWEEP

                args.config = str(DEFAULT_SWEEP)  # the embedded corpus, the tiny model, a 4-trial sweep
            cfg = load_config(args.config, args.set)
            return VERBS[args.verb](cfg, args)
        except InputError as exc:
            console.error(str(exc))
            return EXIT_BAD_INPUT
        except Exception as exc:
            if console.log_path:  # the traceback goes to the log; the terminal gets one line
                import traceback

                traceback.print_exc()
                console.error(f"{type(exc).__name__}: {exc}")
                return 1
            raise


if __name__ == "__main__":
    sys.exit(main())
