"""Models by Hub id: the data stage uses the model's own tokenizer; a trained or too-large one is
refused before Ray starts (exit 2, naming the fields); data.chat_template overrides the template."""

import pytest

from raylm.cli import main
from raylm.config import load_config
from raylm.errors import ConfigError


def test_a_hub_model_brings_its_tokenizer(hub_standins):
    cfg = load_config(None, [f"model.name={hub_standins['qwen2']}", "data.format=chat"])
    assert cfg.data.tokenizer == hub_standins["qwen2"]
    assert load_config(None, ["model.name=tiny-llama"]).data.tokenizer == "train"  # a preset trains one
    other = load_config(None, [f"model.name={hub_standins['qwen2']}", f"data.tokenizer={hub_standins['llama3']}"])
    assert other.data.tokenizer == hub_standins["llama3"]


def test_train_tokenizer_with_a_pretrained_model_is_refused(hub_standins):
    with pytest.raises(ConfigError, match=r"data\.tokenizer: 'train' .*model\.name=raylm-standins/gpt2"):
        load_config(None, [f"model.name={hub_standins['gpt2']}", "data.tokenizer=train"])
    assert main(["data", "--set", f"model.name={hub_standins['gpt2']}", "--set", "data.tokenizer=train"]) == 2


def test_a_model_folder_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        load_config(None, [f"model.name={tmp_path}"])


def test_a_tokenizer_larger_than_the_embeddings_is_refused_before_ray(hub_standins, tmp_path, capsys):
    from raylm.data import embedded_documents, train_tokenizer

    big = train_tokenizer(embedded_documents()[:200], 1500, str(tmp_path / "big"))
    assert main(["data", "--set", f"model.name={hub_standins['gpt2']}", "--set", f"data.tokenizer={big}"]) == 2
    err = capsys.readouterr().err
    assert f"data.tokenizer={big}" in err and "model.name=raylm-standins/gpt2 has embeddings for 1024" in err


def test_an_unknown_hub_model_offline_is_refused(hub_standins, capsys):
    assert main(["data", "--set", "model.name=nobody/no-such-model"]) == 2
    assert "model.name=nobody/no-such-model" in capsys.readouterr().err


def test_chat_template_override(hub_standins, tmp_path):
    from raylm.chat import CHATML_TEMPLATE
    from raylm.data.tokenizer import load_tokenizer

    with pytest.raises(ConfigError, match="data.chat_template"):
        load_config(None, ["data.chat_template=/no/such/file.jinja"])
    assert load_tokenizer(hub_standins["gpt2"], "chatml").chat_template == CHATML_TEMPLATE
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    cfg = load_config(None, [f"data.chat_template={tpl}"])
    assert load_tokenizer(hub_standins["llama3"], cfg.data.chat_template).chat_template == tpl.read_text()


def test_named_tokenizer_copy_is_keyed_by_content(hub_standins, tmp_path):
    """A named tokenizer's copy is published under a digest of its files: the same tokenizer is one
    folder, another template (or a new revision) another one."""
    from raylm.config import DataConfig
    from raylm.data.tokenizer import _tokenizer_for

    def copy(**kw):
        return _tokenizer_for(None, DataConfig(tokenizer=hub_standins["qwen2"], cache_dir=str(tmp_path), **kw), None)

    (a, own), (b, _), (c, chatml) = copy(), copy(), copy(chat_template="chatml")
    assert a == b != c and own == "the tokenizer's own" and chatml == "data.chat_template=chatml"
    assert sorted(p.name for p in (tmp_path / "tokenizers").iterdir()) == sorted({a.rsplit("/", 1)[1], c.rsplit("/", 1)[1]})
