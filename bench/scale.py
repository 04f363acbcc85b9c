"""Real sizes: peak memory and wall time of `ligo grow` with a fixed strategy, streamed (issue 18).

    flock /tmp/heavy.lock python -m bench.scale apply                       # every pair below
    flock /tmp/heavy.lock python -m bench.scale apply --pairs llama-3.2-1b:llama-3.1-8b --strategies stack

For each pair, a RANDOM source checkpoint of the source preset's shape is written to disk (bf16
safetensors, tensor by tensor; a config, no tokenizer), then `ligo grow` runs in a child process
per strategy (`--eval-tokens 0`: nothing to score, so nothing is built). Measured: the child's peak
RSS (``os.wait4``'s ru_maxrss), its wall time, the time of an ``os.sync()`` right after (the grow
does not fsync its output), and the time to write as many bytes to the same disk, through the page
cache with fsync and with O_DIRECT (the "wall under 1.5x write time" criterion: the grow writes its
large tensors with O_DIRECT, ligo_core/direct_io.py, so the second is the stricter measure). Every output is checked from its headers: the sharded
index names every tensor, and each tensor has the shape and dtype of the target model class (built
on the meta device). ``--before REF`` runs the same grow with that git revision's engine (extracted
with ``git archive``) for comparison; only for sizes whose old peak fits the machine.

Rows are appended to docs/results/scale.jsonl; a markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import ROOT, machine
from bench.report import markdown_table
from ligo_core.checkpoint import read_config
from ligo_core.growth import plan_layout
from ligo_core.stream import ShardWriter, write_config
from ligo_core.targets import resolve_target

PAIRS = ("llama-3.2-1b:llama-3.1-8b", "gpt2:gpt2-medium", "gpt2:gpt2-large", "gpt2:gpt2-xl")
RESULTS = ROOT / "docs" / "results" / "scale.jsonl"
GiB = 2**30


def source_config(preset: str):
    config = resolve_target(preset)
    if config.model_type == "llama":
        config.tie_word_embeddings = True  # Llama 3.2 1B ties its embeddings
    return config


def write_random_checkpoint(preset: str, directory: Path, seed: int = 0) -> Path:
    """A bf16 checkpoint of the preset's shape with random weights, written tensor by tensor."""
    directory.mkdir(parents=True)
    config = source_config(preset)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in _lm_class(config)(config).named_parameters()}
    writer = ShardWriter(directory, shapes, torch.bfloat16, "2GB")
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        writer.write(name, tensor)
        del tensor
    writer.finish()
    write_config(directory, config, _lm_class(config), torch.bfloat16)
    return directory


def _lm_class(config):
    import transformers

    from ligo_core.targets import family_of

    return getattr(transformers, family_of(config).lm_classes[0])


def check_output(out: Path, target: str) -> dict:
    """Headers only: the index covers every tensor, each with the target class's shape (and the dtypes)."""
    config = read_config(out)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in _lm_class(config)(config).named_parameters()}
    from safetensors import safe_open

    if (out / "model.safetensors.index.json").is_file():
        index = json.loads((out / "model.safetensors.index.json").read_text())
    else:  # one file: an index of it, to check the same way
        with safe_open(out / "model.safetensors", framework="pt") as f:
            index = {"weight_map": dict.fromkeys(f.keys(), "model.safetensors"),
                     "metadata": {"total_size": (out / "model.safetensors").stat().st_size}}

    got, dtypes = {}, set()
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                got[name] = tuple(piece.get_shape())
                dtypes.add(piece.get_dtype())
                if index["weight_map"][name] != shard:
                    raise AssertionError(f"{name} is in {shard}, the index says {index['weight_map'][name]}")
    if got != expected:
        wrong = sorted(n for n in expected.keys() | got.keys() if got.get(n) != expected.get(n))
        raise AssertionError(f"{len(wrong)} tensors differ from the target's shapes, e.g. {wrong[:3]}")
    plan_layout(config, got)  # and the engine's own check of names against the config
    return {"tensors": len(got), "shards": len(set(index["weight_map"].values())), "dtypes": sorted(dtypes),
            "bytes": index["metadata"]["total_size"]}


def run_grow(src: Path, target: str, out: Path, strategy: str, engine: Path) -> dict:
    """One `ligo grow` in a child process: wall time, then os.sync()'s time, and the child's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(engine), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "ligo_core.cli", "grow", str(src), "--target", target, "--out", str(out),
               "--strategy", strategy, "--json"]
    if engine == ROOT:
        command += ["--eval-tokens", "0", "--memory-gb", "1000"]  # the plan is reported, not a gate here
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, cwd=engine, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate()  # communicate() waits; wait4 below would then find no child
    wall = time.perf_counter() - started
    usage = resource_of(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"ligo grow failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    synced = time.perf_counter()
    os.sync()
    sync = time.perf_counter() - synced
    report = json.loads(stdout)
    return {"wall_s": round(wall, 1), "sync_s": round(sync, 1), "peak_rss_gib": usage,
            "memory_plan_gib": (report.get("memory_plan") or {}).get("gib")}


def resource_of(proc: subprocess.Popen) -> float:
    """Peak RSS of a finished child (GiB), from RUSAGE_CHILDREN: the bench runs one child at a time and
    reads the increase of the maximum, so each child is measured alone (`run_isolated`)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GiB, 2)


def write_time(directory: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` to ``directory``'s disk through the page cache and fsync them."""
    block = os.urandom(64 * 2**20)
    path = directory / ".write-test"
    started = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return round(seconds, 1)


def direct_write_time(directory: Path, nbytes: int) -> float | None:
    """Seconds to write ``nbytes`` to ``directory``'s disk with O_DIRECT (the disk's own speed, and
    how the grow writes large tensors); None where the file system refuses O_DIRECT."""
    import mmap

    block = mmap.mmap(-1, 64 * 2**20)  # page aligned, as O_DIRECT wants
    block.write(os.urandom(len(block)))
    path = directory / ".write-test"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    except (OSError, AttributeError):
        return None
    started = time.perf_counter()
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return round(time.perf_counter() - started, 1)


def engine_at(ref: str, into: Path) -> Path:
    """The engine (ligo_core) of a git revision, extracted to ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref, "ligo_core"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def isolated(args: list[str]) -> dict:
    """Run one measurement in its own process, so RUSAGE_CHILDREN's maximum is that grow's alone."""
    out = subprocess.run([sys.executable, "-m", "bench.scale", "_one", *args], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def one(src: str, target: str, out: str, strategy: str, engine: str) -> None:
    print(json.dumps(run_grow(Path(src), target, Path(out), strategy, Path(engine))))


def apply(pairs: list[str], strategies: list[str], work: Path, before: str | None, before_max_gib: float,
          keep: bool) -> list[dict]:
    rows = []
    where = machine()
    old_engine = engine_at(before, work / "before-engine") if before else None
    for pair in pairs:
        source, target = pair.split(":")
        src = work / f"src-{source}"
        if not src.exists():
            started = time.perf_counter()
            write_random_checkpoint(source, src)
            os.sync()  # the source's own write-back is not the grow's work
            print(f"wrote random {source} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for strategy in strategies:
            runs = [("after", ROOT)]
            target_bytes_estimate = 2 * _count(resolve_target(target, read_config(src)))
            if old_engine is not None and 5 * target_bytes_estimate / GiB < before_max_gib:
                runs.append(("before", old_engine))  # the old path peaked at ~5.5x the bf16 output
            for label, engine in runs:
                out = work / f"out-{source}-{target}-{strategy}-{label}"
                measured = isolated([str(src), target, str(out), strategy, str(engine)])
                checked = check_output(out, target) if label == "after" else None
                nbytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                if not keep:
                    shutil.rmtree(out)
                row = {"pair": pair, "strategy": strategy, "path": label, **measured,
                       "write_s": write_time(work, nbytes), "direct_write_s": direct_write_time(work, nbytes),
                       "output_gib": round(nbytes / GiB, 2),
                       "source_gib": round(src_bytes / GiB, 2), "checked": checked, "machine": where,
                       "engine": before if label == "before" else f"this checkout ({_head()})",
                       "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
                row["wall_over_write"] = round((row["wall_s"] + row["sync_s"]) / row["write_s"], 2)
                if row["direct_write_s"]:
                    row["wall_over_direct_write"] = round((row["wall_s"] + row["sync_s"]) / row["direct_write_s"], 2)
                rows.append(row)
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr)
        if not keep:
            shutil.rmtree(src)
    return rows


def _head() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def _count(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _lm_class(config)(config).parameters())


def table(rows: list[dict]) -> str:
    return markdown_table(
        ["pair", "strategy", "path", "output GiB", "peak RSS GiB", "plan GiB", "wall s", "sync s", "write s (fsync)",
         "(wall+sync)/write", "write s (O_DIRECT)", "(wall+sync)/direct write"],
        [[r["pair"], r["strategy"], r["path"], r["output_gib"], r["peak_rss_gib"], r.get("memory_plan_gib") or "-",
          r["wall_s"], r["sync_s"], r["write_s"], r["wall_over_write"], r.get("direct_write_s") or "-",
          r.get("wall_over_direct_write") or "-"] for r in rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="streamed apply of fixed strategies at real sizes")
    a.add_argument("--pairs", default=",".join(PAIRS), help="source:target presets, comma-separated")
    a.add_argument("--strategies", default="stack,preserve")
    a.add_argument("--work", type=Path, help="where checkpoints go (default: a new temp dir)")
    a.add_argument("--before", help="git revision whose engine to run too (e.g. main)")
    a.add_argument("--before-max-gib", type=float, default=12.0,
                   help="skip the old path where its expected peak (5x the bf16 output) is above this")
    a.add_argument("--keep", action="store_true", help="keep the checkpoints")
    o = sub.add_parser("_one")
    o.add_argument("args", nargs=5)
    args = parser.parse_args(argv)
    if args.command == "_one":
        one(*args.args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="ligo-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = apply(args.pairs.split(","), args.strategies.split(","), work, args.before, args.before_max_gib,
                     args.keep)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {machine()}")
    print(table(rows))


if __name__ == "__main__":
    main()
