"""The data stage on a real local Ray: counts round-trip, shards are disjoint and cover the data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from raylm.config import DataConfig
from raylm.data import DataError, load_tokenizer, make_data_config, prepare_data, split_text


def rows_of(ds) -> list[bytes]:
    return [np.asarray(r["input_ids"], dtype=np.int32).tobytes() for r in ds.iter_rows()]


@pytest.fixture(scope="module")
def shakespeare_data(ray_cluster, shakespeare, cache_dir):
    cfg = DataConfig(source=str(shakespeare), seq_len=64, vocab_size=512, cache_dir=cache_dir)
    return cfg, prepare_data(cfg, verbose=False)


def test_token_count_round_trips(shakespeare_data, shakespeare):
    cfg, prepared = shakespeare_data
    s = prepared.stats
    block_len = cfg.seq_len + 1
    # independent count: tokenize every paragraph in this process, + 1 EOS per document
    tok = load_tokenizer(prepared.tokenizer_dir)
    docs = split_text(shakespeare.read_text(), "paragraph")
    expected = sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)
    assert s.documents == len(docs) and s.tokens == expected
    assert s.blocks * block_len + s.dropped_tokens == s.tokens
    assert 0 <= s.dropped_tokens < block_len
    assert s.train_blocks + s.val_blocks == s.blocks and s.val_blocks >= 1
    lengths = {len(r["input_ids"]) for r in prepared.train.iter_rows()} | {len(r["input_ids"]) for r in prepared.val.iter_rows()}
    assert lengths == {block_len}
    # every document ends with EOS: the EOS count in the blocks equals the document count (minus a dropped tail)
    eos = tok.eos_token_id
    n_eos = sum(int((np.asarray(r["input_ids"]) == eos).sum()) for ds in (prepared.train, prepared.val) for r in ds.iter_rows())
    assert s.documents - 1 <= n_eos <= s.documents


def test_split_is_deterministic(shakespeare_data):
    cfg, prepared = shakespeare_data
    again = prepare_data(cfg, verbose=False)
    assert rows_of(again.val) == rows_of(prepared.val)
    assert set(rows_of(again.train)) == set(rows_of(prepared.train))
    assert not set(rows_of(prepared.train)) & set(rows_of(prepared.val))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_worker_shards_are_disjoint_and_cover(shakespeare_data, world_size):
    _, prepared = shakespeare_data
    shards = make_data_config().configure({"train": prepared.train}, world_size, None, None)
    assert len(shards) == world_size
    seen = [rows_of_iter(s["train"]) for s in shards]
    all_rows = rows_of(prepared.train)
    assert sum(len(s) for s in seen) == len(all_rows)  # nothing dropped
    assert set().union(*map(set, seen)) == set(all_rows)  # covers
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not set(seen[i]) & set(seen[j])  # disjoint
    assert max(map(len, seen)) - min(map(len, seen)) <= 1
    # a shard can be iterated again (the next epoch) and yields the same rows
    assert rows_of_iter(shards[0]["train"]) == seen[0]


def rows_of_iter(it) -> list[bytes]:
    return [np.asarray(b, dtype=np.int32).tobytes() for batch in it.iter_batches(batch_size=16, batch_format="numpy")
            for b in batch["input_ids"]]


def test_jsonl_bad_lines_and_bad_bytes_are_counted(ray_cluster, tmp_path, cache_dir):
    good = [json.dumps({"body": f"document number {i} " * 20}) for i in range(30)]
    (tmp_path / "a.jsonl").write_bytes(("\n".join(good[:15] + ['{"title": "no body"}', "{broken"]) + "\n").encode())
    (tmp_path / "b.jsonl").write_bytes(("\n".join(good[15:]) + "\n").encode() + b'{"body": "bad \xff byte"}\n{"body": "trunc')
    cfg = DataConfig(source=str(tmp_path / "*.jsonl"), text_field="body", seq_len=16, vocab_size=300, cache_dir=cache_dir)
    s = prepare_data(cfg, verbose=False).stats
    assert (s.files, s.documents, s.skipped_records, s.replaced) == (2, 31, 3, 1)


def test_parquet_and_folder_sources(ray_cluster, tmp_path, cache_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} of the parquet corpus, with some words." for i in range(40)]
    pq.write_table(pa.table({"content": texts, "n": list(range(40))}), tmp_path / "part-0.parquet")
    cfg = DataConfig(source=str(tmp_path), text_field="content", seq_len=16, vocab_size=300, cache_dir=cache_dir)
    assert prepare_data(cfg, verbose=False).stats.documents == 40
    with pytest.raises(DataError, match="data.text_field='text'"):
        prepare_data(DataConfig(source=str(tmp_path), seq_len=16, vocab_size=300, cache_dir=cache_dir), verbose=False)


def test_hf_dataset_saved_to_disk(ray_cluster, tmp_path, cache_dir):
    import datasets

    datasets.Dataset.from_dict({"text": [f"hugging face row {i} " * 5 for i in range(25)]}).save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(source=str(tmp_path / "hf"), seq_len=16, vocab_size=300, cache_dir=cache_dir)
    assert prepare_data(cfg, verbose=False).stats.documents == 25


def test_empty_corpus_is_a_clear_error(ray_cluster, tmp_path, cache_dir):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    with pytest.raises(DataError, match="empty"):
        prepare_data(DataConfig(source=str(tmp_path / "empty.txt"), cache_dir=cache_dir), verbose=False)


def test_cli_data_on_embedded_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "raylm", "data", "--json", "--set", f"data.cache_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [json.loads(line) for line in out.stdout.strip().splitlines()]  # --json: nothing but events
    assert [e["event"] for e in events][0] == "start" and events[0]["config"]["data"]["source"] == "embedded"
    stats = next(e for e in events if e["event"] == "data")
    assert stats["documents"] > 50 and stats["blocks"] * 129 + stats["dropped_tokens"] == stats["tokens"]
    assert "documents in" in stats["summary"] and os.path.isdir(stats["tokenizer"])
