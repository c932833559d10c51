import textwrap

import pytest

from raylm.cli import main
from raylm.config import ConfigError, apply_override, load_config


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def test_defaults_validate_and_derive_global_batch():
    cfg = load_config()
    assert cfg.train.effective_global_batch == cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.train.num_workers
    assert cfg.precision == "fp32"  # CPU default
    assert load_config(None, ["train.use_gpu=true"]).precision == "bf16"


def test_unknown_key_names_the_field(tmp_path):
    path = write(tmp_path, "c.yaml", "train:\n  max_stpes: 3\n")
    assert "train.max_stpes: unknown field" in error_of(path)


def test_wrong_type_names_the_field():
    assert "train.max_steps" in error_of(None, ["train.max_steps=abc"])
    assert "deepspeed.zero_stage" in error_of(None, ["deepspeed.zero_stage=4"])


def test_impossible_global_batch_names_the_field():
    msg = error_of(None, ["train.global_batch_size=7", "train.micro_batch_size=4", "train.num_workers=2"])
    assert "train.global_batch_size" in msg and "= 8" in msg
    assert load_config(None, ["train.global_batch_size=16", "train.micro_batch_size=4",
                              "train.grad_accum_steps=2"]).train.global_batch_size == 16


@pytest.mark.parametrize("sets, field", [
    (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], "deepspeed.offload_params"),
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "deepspeed.offload_optimizer"),
    (["deepspeed.precision=fp16"], "deepspeed.precision"),
    (["deepspeed.precision=bf16", "deepspeed.zero_stage=0"], "deepspeed.zero_stage"),  # no fp32 grad accumulation
    (["train.use_gpu=true", "deepspeed.zero_stage=0"], "deepspeed.zero_stage"),  # auto: bf16 on GPU
    (["data.val_fraction=0"], "data.val_fraction"),
    (["serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2"], "serve.autoscaling: max_replicas (2) must be greater than or equal to min_replicas (3)"),  # Ray Serve's own check
    (["serve.default_max_tokens=999"], "serve.default_max_tokens"),
])
def test_impossible_combinations_name_their_field(sets, field):
    assert field in error_of(None, sets)


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "parent.yaml", "train:\n  max_steps: 7\n  lr: 0.5\ntune:\n  search_space:\n    train.lr: {choice: [1, 2]}\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\ntrain:\n  lr: 0.25\ntune:\n  search_space:\n    train.micro_batch_size: {choice: [2]}\n")
    cfg = load_config(child, ["train.max_steps=9"])
    assert (cfg.train.max_steps, cfg.train.lr) == (9, 0.25)
    assert cfg.tune.search_space == {"train.micro_batch_size": {"choice": [2]}}  # replaced, not merged


def test_base_loop_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    assert "loops" in error_of(tmp_path / "a.yaml")
    assert "not found" in error_of(tmp_path / "nope.yaml")


def test_override_parsing():
    tree = apply_override({}, "model.overrides={num_hidden_layers: 3}")
    assert tree == {"model": {"overrides": {"num_hidden_layers": 3}}}
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_override({}, "train.lr")


def test_cli_bad_config_exits_2_before_ray(capsys):
    # ray.init is patched to fail in unit tests: exit code 2 proves the config failed first.
    assert main(["train", "--set", "train.global_batch_size=3"]) == 2
    assert "train.global_batch_size" in capsys.readouterr().err
    assert main(["train", "--set", "data.val_fraction=0"]) == 2  # an empty validation split
    assert "data.val_fraction" in capsys.readouterr().err
    assert main(["tune", "--set", "train.bogus=1"]) == 2
    assert main(["data", "--set", "data.source=/no/such/corpus"]) == 2
    assert "/no/such/corpus" in capsys.readouterr().err


def test_shipped_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    paths = sorted((root / "configs").glob("*.yaml")) + sorted((root / "tune_configs").glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)


def test_placement_strategy_and_worker_labels():
    assert load_config().train.placement_strategy == "PACK"
    cfg = load_config(None, ["train.placement_strategy=SPREAD", "train.worker_node_labels={raylm.io/pool: train}"])
    assert cfg.train.placement_strategy == "SPREAD" and cfg.train.worker_node_labels == {"raylm.io/pool": "train"}
    assert "train.placement_strategy" in error_of(None, ["train.placement_strategy=spread-out"])
    assert "train.worker_node_labels" in error_of(None, ["train.worker_node_labels=[a, b]"])


def test_placement_reaches_ray_train_scaling_config(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from raylm.train import driver

    monkeypatch.setattr(driver, "tokenizer_files", lambda _: {})
    no_data = SimpleNamespace(tokenizer_dir=None, uri=None, manifest=None)
    cfg = load_config(None, ["train.placement_strategy=STRICT_SPREAD", "train.worker_node_labels={raylm.io/pool: train}",
                             f"train.storage_path={tmp_path}"])
    scaling = driver.build_trainer(cfg, no_data).scaling_config
    assert scaling.placement_strategy == "STRICT_SPREAD" and scaling.label_selector == {"raylm.io/pool": "train"}
    default = driver.build_trainer(load_config(None, [f"train.storage_path={tmp_path}"]), no_data).scaling_config
    assert default.placement_strategy == "PACK" and default.label_selector is None


def test_training_config_imports_no_ray_serve():
    """A training worker (and the DeepSpeed dict) reads `train:` without paying for Ray Serve's import;
    only the serve section pulls it in (its autoscaling field is Ray Serve's own type)."""
    import subprocess
    import sys

    probe = ("import sys\n"
             "from raylm.config import TrainConfig, DeepSpeedConfig, DataConfig, ModelConfig, TuneConfig\n"
             "import raylm.config.train\n"
             "assert 'ray.serve' not in sys.modules, 'train config imported ray.serve'\n"
             "from raylm.config import RaylmConfig\n"
             "print('serve' if 'ray.serve' in sys.modules else 'no-serve')\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "serve"  # the whole config does need it: the check above is not vacuous


def test_every_verbs_one_line_help_is_a_whole_sentence():
    """`raylm --help` shows each verb's docstring's first paragraph whole: it once cut three of them
    mid-sentence ('then Ray is not even')."""
    import re

    from raylm.cli import VERBS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    assert set(helps) == set(VERBS)
    for verb, text in helps.items():
        assert text.endswith(".") and text[0].isupper(), (verb, text)
        assert text.count("(") == text.count(")") and text.count("`") % 2 == 0, (verb, text)
        assert not re.search(r"\b(the|a|an|and|or|of|for|from|its|with|is|even)\.$", text), (verb, text)
    assert "then Ray is not even started" in helps["data"]
