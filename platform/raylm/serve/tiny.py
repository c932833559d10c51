"""A tiny random checkpoint (no download) for tests, demos and the serving benchmark.

It is a real Hugging Face directory, the same shape the training stage writes: config.json,
model.safetensors and the tokenizer files, so everything that serves it serves a trained one.
"""

from __future__ import annotations

import os
from pathlib import Path


def make_tiny_checkpoint(out_dir: str, vocab_size: int = 384, seq_len: int = 128, seed: int = 0,
                         documents: int = 40) -> str:
    """Train a byte-level BPE tokenizer on a few embedded documents, build `tiny-llama` with
    random (seeded) weights and save both into `out_dir`; returns `out_dir`."""
    import torch

    from raylm.config import ModelConfig
    from raylm.data import embedded_documents, load_tokenizer, train_tokenizer
    from raylm.model import build_model

    out = Path(out_dir)
    tok_dir = str(out) + ".tokenizer"
    if not os.path.isdir(tok_dir):
        train_tokenizer(embedded_documents()[:documents], vocab_size, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(name="tiny-llama"), len(tokenizer), seq_len, tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)
