"""Stand-ins for models on the Hugging Face Hub: tiny random models of the real architectures, each
with a tokenizer carrying its family's real special tokens and chat template, saved in the Hub
cache layout so that `from_pretrained("ORG/NAME")` resolves them offline exactly as after a download.

    $HF_HOME/hub/models--ORG--NAME/blobs/<sha256>              the files' bytes
    $HF_HOME/hub/models--ORG--NAME/snapshots/<rev>/<file>      links to the blobs (what HF reads)
    $HF_HOME/hub/models--ORG--NAME/refs/main                   <rev>

Families (what each keeps of the real model; everything else is tiny: 2 layers, hidden 64, head_dim
32, which vLLM's CPU attention needs, and a ~1k byte-level BPE plus the family's special tokens):

    llama3   LlamaForCausalLM, Llama-3-Instruct's template (<|begin_of_text|>, <|start_header_id|>,
             <|eot_id|>), EOS <|eot_id|>, no pad token
    qwen2    Qwen2ForCausalLM, tied embeddings, grouped-query attention (2 heads, 1 KV head),
             Qwen2.5-Instruct's ChatML template (<|im_start|>, <|im_end|>), pad <|endoftext|>
    mistral  MistralForCausalLM, grouped-query attention, Mistral-7B-Instruct-v0.2's [INST] template
             (user/assistant only), <s> / </s>
    gemma2   Gemma2ForCausalLM (logit soft-capping, sliding window), Gemma-2's template
             (<start_of_turn>, <end_of_turn>; refuses a system turn)
    phi3     Phi3ForCausalLM, Phi-3-mini-instruct's template (<|user|>, <|end|>, <|assistant|>, EOS
             after a finished conversation)
    gpt2     GPT2LMHeadModel, dropout 0.1 (GPT-2's own), no chat template

The templates are the published tokenizer_config.json texts: TRL ships them byte for byte
(trl/chat_templates, checked weekly against the Hub repos); Mistral's is copied here. The vocab
size of each model is rounded up to a multiple of 64 (as real models pad theirs), so the
tokenizer's ids fit with room to spare. Building all six takes a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

ORG = "raylm-standins"

MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.2, tokenizer_config.json
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def trl_template(name: str) -> str:
    """A published chat template, as TRL keeps it (trl/chat_templates/<name>.jinja)."""
    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text()


@dataclass(frozen=True)
class Family:
    key: str
    repo: str  # ORG/NAME
    arch: str  # transformers config class
    config: dict
    special: dict  # bos/eos/pad/unk -> token
    extra: tuple  # other special tokens (turn markers)
    template: Optional[str]  # None: no chat template (GPT-2)
    end_of_turn: Optional[str]  # the token that ends an assistant turn (trained)
    system: bool = True  # the template accepts a system turn
    generation_eos: tuple = ()  # generation_config.json eos tokens (besides the tokenizer's EOS)
    notes: dict = field(default_factory=dict)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=512)

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("llama3", f"{ORG}/llama-3-instruct", "LlamaConfig", dict(SMALL, num_key_value_heads=2),
           dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
           ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"),
           trl_template("llama3"), "<|eot_id|>", generation_eos=("<|end_of_text|>",)),
    Family("qwen2", f"{ORG}/qwen2.5-instruct", "Qwen2Config",
           dict(SMALL, num_key_value_heads=1, tie_word_embeddings=True),
           dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), ("<|im_start|>",),
           trl_template("qwen2_5"), "<|im_end|>", generation_eos=("<|endoftext|>",)),
    Family("mistral", f"{ORG}/mistral-instruct", "MistralConfig",
           dict(SMALL, num_key_value_heads=1, sliding_window=None),
           dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), (),
           MISTRAL_TEMPLATE, "</s>", system=False),
    Family("gemma2", f"{ORG}/gemma-2-it", "Gemma2Config",
           dict(SMALL, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=256),
           dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
           ("<start_of_turn>", "<end_of_turn>"), trl_template("gemma"), "<end_of_turn>", system=False,
           generation_eos=("<end_of_turn>",)),
    Family("phi3", f"{ORG}/phi-3-mini-instruct", "Phi3Config", dict(SMALL, num_key_value_heads=2),
           dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
           ("</s>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"),
           trl_template("phi3"), "<|end|>", generation_eos=("<|end|>", "<|assistant|>")),
    Family("gpt2", f"{ORG}/gpt2", "GPT2Config",
           dict(n_embd=64, n_layer=2, n_head=2, n_positions=512),  # dropouts: GPT-2's 0.1 defaults
           dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"), (),
           None, None),
)}


def _corpus_text(limit: int = 24_000) -> str:
    """A few KB of English to train the shared BPE on: the Python help text shipped with every
    interpreter (raylm's 'embedded' source), so no file outside the repo is needed."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics.values())[:limit]


def _base_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = _corpus_text()
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    return tok


def family_tokenizer(fam: Family, base_json: str) -> Any:
    """The shared BPE with the family's special tokens (ids after the BPE's) and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*fam.special.values(), *fam.extra]))
    tok = Tokenizer.from_str(base_json)
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **fam.special)
    if fam.template is not None:
        fast.chat_template = fam.template
    return fast


def family_model(fam: Family, tokenizer: Any, seed: int = 0) -> Any:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    vocab = -(-len(tokenizer) // 64) * 64
    ids = {k.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(v) for k, v in fam.special.items()
           if k != "unk_token"}
    cfg = getattr(transformers, fam.arch)(vocab_size=vocab, **ids, **fam.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    eos = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in fam.generation_eos]
    model.generation_config = GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=eos,
                                               pad_token_id=ids.get("pad_token_id"))
    return model


def _publish(snapshot_files: Path, hub: Path, repo: str) -> Path:
    """Move a saved folder into the Hub cache layout (blobs, snapshots/<rev> links, refs/main)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    files = sorted(p for p in snapshot_files.iterdir() if p.is_file())
    rev = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = root / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        if not blob.exists():
            shutil.move(str(p), blob)
        link = snap / p.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap


def build_standins(hf_home: str, families: Optional[list[str]] = None, vocab_size: int = 1000) -> dict[str, str]:
    """Build the stand-ins into `hf_home`/hub; returns {family: repo id}."""
    hub = Path(hf_home) / "hub"
    base = _base_tokenizer(vocab_size).to_str()
    out = {}
    for key in families or list(FAMILIES):
        fam = FAMILIES[key]
        tok = family_tokenizer(fam, base)
        model = family_model(fam, tok)
        with tempfile.TemporaryDirectory(dir=hf_home) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            _publish(Path(tmp), hub, fam.repo)
        out[key] = fam.repo
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Build the Hub stand-ins into HF_HOME (default: $HF_HOME)")
    p.add_argument("--hf-home", default=os.environ.get("HF_HOME"))
    args = p.parse_args()
    print(json.dumps(build_standins(args.hf_home)))


if __name__ == "__main__":
    main()
