"""The data stage on a real local Ray: counts round-trip, shards are disjoint and cover the data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_env import clean_env

from raylm.config import DataConfig
from raylm.data import (CacheStream, DataError, TrainStream, fingerprint, load_tokenizer, prepare_data,
                        resolve_source, split_text)


def rows_of(ds) -> list[bytes]:
    return [np.asarray(r["input_ids"], dtype=np.int32).tobytes() for r in ds.iter_rows()]


def cache_rows(prepared, split: str) -> list[bytes]:
    """A split's rows in file order, read straight from the cache's Parquet shards (no Ray)."""
    import pyarrow.parquet as pq

    from raylm.data.cache import from_arrow

    return [r.tobytes() for f in prepared.manifest[split]["files"]
            for r in from_arrow(pq.read_table(os.path.join(prepared.uri, f["path"])).column("input_ids"))]


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


def test_cache_is_reused_rebuilt_when_cut_off_and_new_when_the_source_changes(shakespeare_data, tmp_path, capsys):
    cfg, prepared = shakespeare_data
    before = {split: cache_rows(prepared, split) for split in ("train", "val")}
    assert not set(before["train"]) & set(before["val"])  # train and val disjoint
    again = prepare_data(cfg, verbose=False)
    assert not again.built and again.uri == prepared.uri and again.manifest == prepared.manifest
    assert again.stats.seconds < prepared.build_s
    # a build cut off before its manifest is never read: it is rebuilt (and said), to the same rows
    os.remove(os.path.join(prepared.uri, "raylm_dataset.json"))
    rebuilt = prepare_data(cfg, verbose=False)
    assert rebuilt.built and "incomplete" in capsys.readouterr().out
    assert {split: cache_rows(rebuilt, split) for split in ("train", "val")} == before  # the same rows, in order
    # a shard that does not match the manifest: rebuilt too
    shard = os.path.join(prepared.uri, rebuilt.manifest["train"]["files"][0]["path"])
    with open(shard, "ab") as f:
        f.write(b"x")
    assert prepare_data(cfg, verbose=False).built and "does not match" in capsys.readouterr().out
    # a changed source file is a new fingerprint, never a silent reuse
    moved = cfg.model_copy(update={"source": str(tmp_path / "corpus.txt")})
    (tmp_path / "corpus.txt").write_text(open(cfg.source).read())
    first = fingerprint(moved, resolve_source(moved))
    (tmp_path / "corpus.txt").write_text(open(cfg.source).read() + "\n\nOne more paragraph.")
    assert fingerprint(moved, resolve_source(moved)) != first
    assert fingerprint(cfg.model_copy(update={"seq_len": 32}), resolve_source(cfg)) != fingerprint(cfg, resolve_source(cfg))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_streams_are_disjoint_equal_and_reshuffled_per_epoch(shakespeare_data, world_size):
    _, prepared = shakespeare_data
    all_train = set(cache_rows(prepared, "train"))
    epochs = []
    for epoch in (0, 1):
        per_rank = [[np.asarray(r, dtype=np.int32).tobytes() for b in
                     CacheStream(prepared.uri, prepared.manifest, "train", rank, world_size)
                     .train_batches(seed=0, epoch=epoch, batch_size=4, buffer_rows=64) for r in b["input_ids"]]
                    for rank in range(world_size)]
        assert len({len(p) for p in per_rank}) == 1  # every rank the same number of batches
        flat = [r for p in per_rank for r in p]
        assert len(flat) == len(set(flat)) and set(flat) <= all_train  # disjoint, from the train split
        unit = max(u[3] - u[2] for u in CacheStream(prepared.uri, prepared.manifest, "train", 0, world_size).units)
        assert len(flat) >= len(all_train) - world_size * (unit + 4)  # all but the ranks' uneven tails
        epochs.append(per_rank)
    assert epochs[0][0] != epochs[1][0]  # each epoch in another order
    # validation: every rank as many batches, together all of val, once
    val = [list(CacheStream(prepared.uri, prepared.manifest, "val", r, world_size).val_batches(batch_size=8))
           for r in range(world_size)]
    assert len({len(v) for v in val}) == 1
    rows = [np.asarray(r, dtype=np.int32).tobytes() for v in val for b in v for r in b["input_ids"]]
    assert sorted(rows) == sorted(cache_rows(prepared, "val"))


def test_resumed_stream_continues_with_the_next_step(shakespeare_data):
    _, prepared = shakespeare_data

    def stream(epoch: int = 0, steps: int = 0, micro: int = 4, accum: int = 2) -> TrainStream:
        return TrainStream(CacheStream(prepared.uri, prepared.manifest, "train", 1, 2), 3, micro, accum, 32, epoch,
                           steps * 8)

    whole = stream()
    it = iter(whole)
    n = whole.stream.epoch_batches(3, 0, 8)
    seen = [np.concatenate([m["input_ids"] for m in next(it)]) for _ in range(n + 5)]  # into the second epoch
    assert (whole.epoch, whole.rows) == (1, 40)
    for k in (3, n, n + 2):
        for micro, accum in ((4, 2), (8, 1)):  # the same step, whichever cut resumes it
            step = next(iter(stream(*divmod(k, n), micro=micro, accum=accum)))
            assert np.array_equal(np.concatenate([m["input_ids"] for m in step]), seen[k])


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
    def raylm_data() -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "raylm", "data", "--json", "--address", "local", "--set",
                              f"data.cache_dir={tmp_path}", "--set", f"train.storage_path={tmp_path}"],
                             env=clean_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return [json.loads(line) for line in out.stdout.strip().splitlines()]  # --json: nothing but events

    events = raylm_data()
    built = next(e for e in events if e["event"] == "data_cache")
    assert built["built"] and built["uri"].startswith(str(tmp_path / "datasets"))
    reused = next(e for e in raylm_data() if e["event"] == "data_cache")  # the second run: no Ray, no tokenizing
    assert not reused["built"] and reused["uri"] == built["uri"] and reused["seconds"] < built["build_s"]
    assert [e["event"] for e in events][0] == "start" and events[0]["config"]["data"]["source"] == "embedded"
    stats = next(e for e in events if e["event"] == "data")
    assert stats["documents"] > 50 and stats["blocks"] * 129 + stats["dropped_tokens"] == stats["tokens"]
    assert "documents in" in stats["summary"] and os.path.isdir(stats["tokenizer"])


def test_two_data_runs_at_once_leave_one_valid_cache(ray_cluster, tmp_path, shakespeare):
    """`raylm data` twice at once on one config, as two users' shells would start it on one cluster
    (clean environments with RAY_ADDRESS; two Ray heads on one machine would clash): both succeed,
    and the storage holds one complete cache and no build folder; neither deleted what the other
    was writing."""
    from raylm.data.cache import open_cache

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare.read_text()[:300_000])
    env = clean_env(RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    args = [sys.executable, "-m", "raylm", "data", "--json", "--set", f"data.source={corpus}",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"train.storage_path={tmp_path / 'store'}",
            "--set", "data.vocab_size=400", "--set", "data.seq_len=32"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    uris = {next(json.loads(line) for line in out.splitlines() if '"data_cache"' in line)["uri"] for out, _ in outs}
    datasets = tmp_path / "store" / "datasets"
    assert len(uris) == 1 and [d.name for d in datasets.iterdir()] == [os.path.basename(uris.pop())]
    manifest, why = open_cache(str(next(datasets.iterdir())))
    assert manifest is not None, why
    assert manifest["train"]["rows"] > 0 and manifest["val"]["rows"] > 0
