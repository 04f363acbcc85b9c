"""Load and memory benchmark of the API: status reads under 100 clients, and a 1 GiB upload.

1. Starts ``ligo serve --no-worker`` (uvicorn, embedded defaults: SQLite, local storage) on a
   loopback port with a fresh data directory, and puts a tiny checkpoint and ``--jobs`` jobs
   (each with a 100-step loss history, as a running job has) into its job store.
2. Status reads: ``--clients`` concurrent clients, each on one keep-alive connection, each
   sending ``GET /v1/jobs/{id}`` (a random job) with its API key and waiting for the answer,
   for ``--seconds`` after a short warm-up. Reports reads/s and latency percentiles. The
   client is a minimal asyncio HTTP/1.1 client so that it costs the server little CPU.
3. Upload memory: streams a ``--upload-gib`` archive (a tiny GPT-2 checkpoint padded with
   random bytes, read from disk in 1 MiB chunks) to ``POST /v1/checkpoints`` while sampling
   the API process's resident memory every 10 ms; reports the peak growth over the RSS
   before the upload. The upload is checked by the service and must answer 201.

    python -m bench.api_load [--clients 100] [--seconds 20] [--upload-gib 1] [--json out.json]

Goals (issue 4): at least 1,000 reads/s with p99 under 50 ms on 2 cores; memory growth under
64 MiB during the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx

from bench.common import ROOT, machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(session: int) -> int:
    """Resident memory of the API processes together (one unless --workers > 1)."""
    total = 0
    for pid in api_pids(session):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def tiny_checkpoint(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from ligo_core.data import default_corpus_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_corpus_texts()[:200], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=64)).save_pretrained(directory)


def padded_archive(model_dir: Path, path: Path, size: int) -> str:
    """An uncompressed tar of the model directory plus a random padding member, ``size`` bytes in all."""
    head = io.BytesIO()
    with tarfile.open(fileobj=head, mode="w") as tar:
        tar.add(model_dir, arcname="model")
    members = head.getvalue()[:-1024]  # drop the end-of-archive blocks; appended below
    pad = size - len(members) - 512 - 1024
    pad -= pad % 512
    info = tarfile.TarInfo("model/padding.bin")
    info.size = pad
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for block in (members, info.tobuf(format=tarfile.GNU_FORMAT)):
            f.write(block)
            sha.update(block)
        chunk = os.urandom(2**20)
        left = pad
        while left:
            part = chunk[: min(left, len(chunk))]
            f.write(part)
            sha.update(part)
            left -= len(part)
        tail = b"\0" * 1024
        f.write(tail)
        sha.update(tail)
    return sha.hexdigest()


def seed_store(data_dir: Path, model_dir: Path, n_jobs: int) -> tuple[str, list[str]]:
    """An API key and ``n_jobs`` running jobs with 100-step loss histories, written to the store."""
    from app.auth import create_key
    from app.db import Checkpoint, Database, Job, new_id, utcnow
    from app.migrate import upgrade

    url = f"sqlite:///{data_dir / 'ligo.db'}"
    upgrade(url)
    db = Database(url)
    key = create_key(db, "bench")
    config = json.loads((model_dir / "config.json").read_text())
    ids = []
    with db.write() as s:
        ckpt = Checkpoint(id=new_id(), tenant="bench", filename="tiny.tar", size_bytes=1, sha256="0" * 64,
                          family="gpt2", model_type="gpt2", config=config, num_parameters=1, has_tokenizer=True,
                          layout="archive", object_key="checkpoints/x/tiny.tar")
        s.add(ckpt)
        now = utcnow()
        for i in range(n_jobs):
            history = [[step, 6.0 - step * 0.01] for step in range(1, 101)]
            job = Job(id=new_id(), tenant="bench", checkpoint_id=ckpt.id, state="running", stage="fitting",
                      progress_step=100, progress_total=200, progress_loss=5.0, loss_history=history,
                      target="layers=4,hidden=48,heads=6,ffn=192", target_config={}, strategy="ligo",
                      fit={"steps": 200, "lr": None, "batch_size": None, "seq_len": None, "data_uri": None},
                      plan={"tokens": None, "gpu": "H100", "price_per_gpu_hour": None, "utilisation": None},
                      seed=0, attempts=1, cancel_requested=False, created_at=now - timedelta(seconds=i),
                      started_at=now, lease_owner="bench", lease_expires_at=now + timedelta(days=1))
            s.add(job)
            ids.append(job.id)
    db.dispose()
    return key, ids


# --- a minimal keep-alive HTTP/1.1 client ------------------------------------------------------

def api_pids(session: int) -> list[int]:
    """The server's processes (uvicorn and its workers), not its checkpoint validator."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if int(stat[3]) == session and b"app.validator" not in cmd:
            pids.append(int(entry))
    return pids


def cpu_seconds(session: int) -> float:
    total = 0.0
    for pid in api_pids(session):
        with contextlib.suppress(OSError):
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def client_loop(port: int, key: str, ids: list[str], stop_at: float, record_from: float,
                      interval: float | None, latencies: list[float], errors: list[str]) -> None:
    """Closed loop (interval None): next request as soon as the answer is in. Open loop: one
    request every ``interval`` seconds, latency counted from when it was due (so a slow answer
    also delays, and is charged to, the requests queued behind it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    rng = random.Random()
    due = time.perf_counter() + (rng.random() * interval if interval else 0.0)
    try:
        while True:
            if interval:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            start = due if interval else time.perf_counter()
            if start >= stop_at:
                return
            path = f"/v1/jobs/{rng.choice(ids)}"
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                         "Accept: application/json\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            done = time.perf_counter()
            if status != 200 or not body.startswith(b'{"id"'):
                errors.append(f"{status} {body[:100]!r}")
            elif start >= record_from:
                latencies.append(done - start)
            if interval:
                due += interval
    finally:
        writer.close()


async def run_reads(port: int, key: str, ids: list[str], clients: int, seconds: float, warmup: float,
                    rate: float | None, server_pid: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    interval = clients / rate if rate else None
    start = time.perf_counter()
    record_from, stop_at = start + warmup, start + warmup + seconds
    cpu = {}

    async def mark():
        await asyncio.sleep(warmup)
        cpu["server"], cpu["client"] = cpu_seconds(server_pid), time.process_time()
        await asyncio.sleep(seconds)
        cpu["server"] = cpu_seconds(server_pid) - cpu["server"]
        cpu["client"] = time.process_time() - cpu["client"]

    await asyncio.gather(mark(), *(client_loop(port, key, ids, stop_at, record_from, interval, latencies, errors)
                                   for _ in range(clients)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    n = len(latencies)
    return {"mode": f"open loop, {rate:.0f}/s offered" if rate else "closed loop", "clients": clients,
            "seconds": seconds, "reads": n, "errors": len(errors), "first_errors": errors[:3],
            "reads_per_s": n / seconds, "p50_ms": q[49] * 1000, "p90_ms": q[89] * 1000, "p99_ms": q[98] * 1000,
            "max_ms": latencies[-1] * 1000, "server_cpu_us_per_read": cpu["server"] / n * 1e6,
            "client_cpu_us_per_read": cpu["client"] / n * 1e6}


# --- upload memory -----------------------------------------------------------------------------

def measure_upload(base: str, key: str, session: int, archive: Path, sha: str) -> dict:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"}
    # Warm up the path (imports, validator process) with a small upload first.
    small = archive.with_name("small.tar")
    with tarfile.open(small, "w") as tar:
        tar.add(archive.parent / "model", arcname="model")
    r = httpx.post(f"{base}/v1/checkpoints", params={"filename": "small.tar"}, content=small.read_bytes(),
                   headers=headers, timeout=300)
    assert r.status_code == 201, r.text
    time.sleep(1.0)
    baseline = rss_bytes(session)
    samples, stop = [baseline], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(rss_bytes(session))
            time.sleep(0.01)

    def chunks():
        with open(archive, "rb") as f:
            while chunk := f.read(2**20):
                yield chunk

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    size = archive.stat().st_size
    r = httpx.post(f"{base}/v1/checkpoints", params={"filename": "big.tar"}, content=chunks(),
                   headers={**headers, "Content-Length": str(size)}, timeout=3600)
    elapsed = time.perf_counter() - t0
    stop.set()
    thread.join()
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == sha and r.json()["size_bytes"] == size
    return {"upload_bytes": size, "seconds": elapsed, "mib_per_s": size / 2**20 / elapsed,
            "rss_before_mib": baseline / 2**20, "rss_peak_mib": max(samples) / 2**20,
            "growth_mib": (max(samples) - baseline) / 2**20, "samples": len(samples)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rate", type=float, default=1000.0,
                   help="offered reads/s of the open-loop run (0: skip it); the closed-loop run always happens")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--warmup", type=float, default=3)
    p.add_argument("--jobs", type=int, default=100)
    p.add_argument("--upload-gib", type=float, default=1.0)
    p.add_argument("--skip-upload", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="ligo-bench-") as tmp:
        tmp = Path(tmp)
        data, model = tmp / "data", tmp / "model"
        data.mkdir()
        model.mkdir()
        tiny_checkpoint(model)
        key, ids = seed_store(data, model, args.jobs)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIGO_")}
        env.update(LIGO_DATA_DIR=str(data), LIGO_MAINTENANCE_INTERVAL_SECONDS="5",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--port", str(port),
                                   "--data-dir", str(data), "--log-level", "warning", "--workers", str(args.workers)],
                                  env=env, cwd=ROOT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
            try:
                import uvloop

                uvloop.install()
            except ImportError:
                pass
            reads = [asyncio.run(run_reads(port, key, ids, args.clients, args.seconds, args.warmup, None, server.pid))]
            if args.rate:
                reads.append(asyncio.run(run_reads(port, key, ids, args.clients, args.seconds, args.warmup,
                                                   args.rate, server.pid)))
            upload = None
            if not args.skip_upload:
                archive = tmp / "big.tar"
                sha = padded_archive(model, archive, int(args.upload_gib * 2**30))
                upload = measure_upload(base, key, server.pid, archive, sha)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()

    results = {"machine": machine(), "reads": reads, "upload": upload,
               "command": "python -m bench.api_load " + " ".join(sys.argv[1:])}
    for r in reads:
        print(f"status reads, {r['mode']}: {r['clients']} clients, {r['reads']} reads in {r['seconds']:.0f} s, "
              f"{r['errors']} errors")
        print(f"  {r['reads_per_s']:.0f} reads/s   p50 {r['p50_ms']:.1f} ms   p90 {r['p90_ms']:.1f} ms   "
              f"p99 {r['p99_ms']:.1f} ms   max {r['max_ms']:.1f} ms   server CPU {r['server_cpu_us_per_read']:.0f} us"
              f"/read, client CPU {r['client_cpu_us_per_read']:.0f} us/read")
    if upload:
        u = upload
        print(f"upload: {u['upload_bytes'] / 2**30:.2f} GiB in {u['seconds']:.1f} s ({u['mib_per_s']:.0f} MiB/s); "
              f"API RSS {u['rss_before_mib']:.0f} -> peak {u['rss_peak_mib']:.0f} MiB "
              f"(growth {u['growth_mib']:.1f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if not any(r["errors"] for r in reads) else 1


if __name__ == "__main__":
    sys.exit(main())
