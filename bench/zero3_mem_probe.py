"""Where a worker's RSS goes under ZeRO-0 / ZeRO-3: the probe behind bench/RESULTS.md section 8's
breakdown. Two gloo ranks in plain processes (no Ray), the bench's model and data, raylm's `_engine`
(or the bench's built-whole path); each rank records VmRSS/VmHWM after the engine is built and after
each backward and step, then names the large anonymous mappings (/proc/self/smaps) by the tensors
they hold (partitions, fp32 masters, gradient buffers, the reduce bucket, Adam state).

    PYTHONPATH=platform .venv/bin/python bench/zero3_mem_probe.py zero3 '{}' full /tmp/probe-z3
    PYTHONPATH=platform .venv/bin/python bench/zero3_mem_probe.py zero3 '{"zero.sub_group_size": 1e9}' full /tmp/p
    MALLOC_MMAP_THRESHOLD_=131072 ... zero0 '{}' full /tmp/p   # glibc's threshold fixed from the start
    PROBE_TRIM=1 ... zero3-glibc '{}' full /tmp/p   # malloc_trim(0) after every backward and step

The variant is one of bench/zero3_mem_bench.py's (its config overrides; zero3-whole builds whole).

The JSON argument patches raylm's DeepSpeed dict ("zero.<key>" goes into zero_optimization)."""
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "platform"))


def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0


def big_maps(min_mib=4.0):
    """(start, end, rss_mib) of anonymous mappings with at least min_mib resident."""
    out, cur = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            a, b = (int(x, 16) for x in parts[0].split("-"))
            cur = [a, b, 0.0, parts[5] if len(parts) > 5 else ""]
            out.append(cur)
        elif parts[0] == "Rss:" and cur is not None:
            cur[2] = int(parts[1]) / 1024.0
    return [m for m in out if m[2] >= min_mib]


def worker(rank, world, variant, extra, tok_dir, overrides, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import zero3_mem_bench as zb
    from raylm.data import load_tokenizer
    import raylm.train.deepspeed as rds
    from raylm.train.loop import _engine
    from raylm.train.step import backward_global_batch

    orig = rds.deepspeed_config

    def patched(cfg):
        d = orig(cfg)
        for k, v in extra.items():
            v = int(v) if isinstance(v, float) else v
            if k.startswith("zero."):
                d["zero_optimization"][k[5:]] = v
            else:
                d[k] = v
        return d

    rds.deepspeed_config = patched
    zb.VARIANTS.setdefault(variant, {})
    cfg = zb.bench_config(tok_dir, os.path.join(os.path.dirname(os.path.abspath(out)), "probe-runs"), overrides, variant if variant in zb.VARIANTS else "zero3")
    tokenizer = load_tokenizer(tok_dir)
    ids = tokenizer(zb.CORPUS.read_text()[:200_000])["input_ids"]
    blocks = torch.tensor([ids[i * 129:(i + 1) * 129] for i in range(6)], dtype=torch.long)[rank::world]
    phases = []
    import ctypes

    trim = (lambda: ctypes.CDLL(None).malloc_trim(0)) if os.environ.get("PROBE_TRIM") == "1" else (lambda: None)
    losses = []

    def mark(name):
        phases.append((name, round(status("VmRSS"), 0), round(status("VmHWM"), 0), round(time.perf_counter(), 2)))

    mark("start")
    start_maps = round(sum(m[2] for m in big_maps()))
    engine = zb._engine_before(cfg, tokenizer) if variant == "zero3-whole" else _engine(cfg, tokenizer)[0]
    mark("engine")
    for step in range(3):
        ls, nt = backward_global_batch(engine, [{"input_ids": blocks[step:step + 1]}], None)
        trim()
        mark(f"bwd{step}")
        losses.append(round(ls / max(nt, 1), 6))
        engine.step()
        trim()
        mark(f"step{step}")
    # name the big buffers
    names = {}
    opt = engine.optimizer

    def reg(name, t):
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            names.setdefault(t.untyped_storage().data_ptr(), (name, t.untyped_storage().nbytes() / 2**20))

    for n, p in engine.module.named_parameters():
        reg("param:" + n, p.data)
        if hasattr(p, "ds_tensor"):
            reg("ds_tensor:" + n, p.ds_tensor)
        if p.grad is not None:
            reg("grad:" + n, p.grad)
    for attr in ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat", "grad_partitions_flat_buffer",
                 "bit16_groups_flat", "single_partition_of_fp32_groups"):
        v = getattr(opt, attr, None)
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            reg(f"opt.{attr}[{i}]", t)
    for dtype, b in getattr(opt, "ipg_buckets", {}).items():
        reg(f"ipg_bucket[{dtype}]", getattr(b, "buffer", None))
    inner = getattr(opt, "optimizer", opt)
    for i, (p, st) in enumerate(inner.state.items()):
        for k, v in st.items():
            reg(f"adam[{i}].{k}", v)
    maps = big_maps()
    named = []
    for a, b, rss, _ in maps:
        hit = [f"{n} ({mb:.0f} MiB)" for ptr, (n, mb) in names.items() if a <= ptr < b]
        named.append({"map_mib": round((b - a) / 2**20), "rss_mib": round(rss), "holds": hit[:4] + ([f"+{len(hit) - 4}"] if len(hit) > 4 else [])})
    rec = {"losses": losses, "rank": rank, "variant": variant, "extra": extra, "phases": phases,
           "anon_rss_big_mib": round(sum(m[2] for m in maps)), "start_anon_big_mib": start_maps, "maps": named}
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump(rec, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    variant, extra, quick, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "quick", sys.argv[4]
    import zero3_mem_bench as zb
    overrides = zb.QUICK_OVERRIDES if quick else zb.OVERRIDES
    from common import bench_tokenizer

    tok = bench_tokenizer(os.path.join(os.path.dirname(os.path.abspath(out)), "probe-tok"))
    mp.spawn(worker, args=(2, variant, extra, tok, overrides, out), nprocs=2, join=True)
    for r in range(2):
        rec = json.load(open(f"{out}-rank{r}.json"))
        print(json.dumps({k: rec[k] for k in ("rank", "variant", "extra", "phases", "anon_rss_big_mib", "losses")}))
        if r == 0:
            for m in rec["maps"]:
                print("   ", m)
