"""One grow across several local processes: data-parallel LiGO fitting under torch.distributed.

``grow_parallel(src, target, out, nproc=N, ...)`` starts PyTorch's elastic launcher
(``python -m torch.distributed.run --standalone --nproc-per-node N``) on this module. Every rank
loads the checkpoint and the text, builds the same operator from the same seed and draws the same
global batches; ``fit_operator`` scores each rank's slice and sums the operator's gradients over
the ranks (ligo_core/growth.py), so N processes fit what one process fits on the whole batch.
Each rank makes the large model a block at a time (ligo_core/layerwise.py). Ranks use NCCL on
GPUs (rank ``r`` on ``cuda:r``) and gloo on the CPU.

Rank 0 sends its progress events to the launching process on stdout and alone writes the output
(all or nothing, as ``ligo_core.output`` always does). A rank that fails makes the launcher stop
the others (``--max-restarts 0``); the launching process then removes whatever the run left and
raises the first failed rank's error, with its rank. Cancelling stops the whole group.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess  # nosec B404 - launches this package's own ranks, no shell
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ligo_core import catalog, errors
from ligo_core.errors import GrowthCancelled, LigoError
from ligo_core.output import REPORT_NAME, check_output_dir

EVENT_PREFIX = "LIGO-EVENT "
ERRORS_DIR = "errors"


class RankFailed(RuntimeError):
    """A rank failed with an error that is not one of ligo_core's own (out of memory, a bug)."""


def grow_parallel(
    src: str | Path,
    target,
    out_dir: str | Path,
    *,
    nproc: int,
    progress: Callable[[dict], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    **options,
) -> dict:
    """``ligo_core.grow`` run by ``nproc`` processes; returns rank 0's report. ``options`` are
    ``grow``'s keyword arguments (plain values: they travel as JSON)."""
    if nproc < 1:
        raise LigoError(f"nproc must be at least 1, got {nproc}")
    name = options.get("strategy", catalog.DEFAULT_STRATEGY)
    fitted = name in catalog.STRATEGY_NAMES and catalog.strategy(name).fitted  # an unknown name: grow names it
    if nproc == 1 or not fitted or options.get("fit_steps", catalog.DEFAULT_FIT_STEPS) == 0:
        from ligo_core.pipeline import grow  # nothing to fit: more processes would only repeat the work

        return grow(src, target, out_dir, progress=progress, should_cancel=should_cancel, **options)
    _check_devices(options.get("device"), nproc)
    out = check_output_dir(out_dir).resolve()
    existed = out.exists()
    with tempfile.TemporaryDirectory(prefix="ligo-ranks-") as run_dir:
        run = Path(run_dir)
        (run / ERRORS_DIR).mkdir()
        (run / "job.json").write_text(json.dumps({
            "src": str(Path(src).resolve()), "target": _portable_target(target, run), "out_dir": str(out),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        }))
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "--max-restarts=0", "-m", "ligo_core.parallel", str(run)]
        # A fixed command (this Python, torch's launcher, this module), no shell: nothing a user typed.
        with open(run / "launcher.log", "w") as log:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env,  # nosec B603
                                    start_new_session=True)  # its own process group: cancel stops every rank
            try:
                _follow(proc, progress, should_cancel)
            except BaseException:
                _stop(proc)
                _remove_partial(out, existed)
                raise
        if proc.returncode != 0:
            _remove_partial(out, existed)
            raise _failure(run, nproc, proc.returncode)
        return json.loads((out / REPORT_NAME).read_text())


def _check_devices(device: str | None, nproc: int) -> None:
    """Before any rank starts: the device exists, and on CUDA there is a GPU for every rank."""
    import torch

    from ligo_core.errors import DeviceError
    from ligo_core.training import default_device

    chosen = default_device(device)
    if chosen.type == "cuda" and nproc > torch.cuda.device_count():
        raise DeviceError(f"{nproc} processes need {nproc} CUDA GPUs (rank r runs on cuda:r); this machine has "
                          f"{torch.cuda.device_count()}", field="nproc")


def _portable_target(target, run: Path):
    """A config object travels as a config.json that ``resolve_target`` reads; names and fields as they are."""
    if hasattr(target, "to_json_file"):
        path = run / "target" / "config.json"
        path.parent.mkdir()
        target.to_json_file(path)
        return str(path)
    return str(target) if isinstance(target, Path) else target


def _follow(proc: subprocess.Popen, progress, should_cancel) -> None:
    """Pass rank 0's events on until the launcher exits; stop the group if the caller cancels."""
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    while True:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            line = None
        if line is not None:
            if line.startswith(EVENT_PREFIX):
                if progress is not None:
                    progress(json.loads(line[len(EVENT_PREFIX):]))
            else:
                sys.stdout.write(line)
        if should_cancel is not None and should_cancel():
            raise GrowthCancelled()
        if line is None and proc.poll() is not None and not reader.is_alive():
            return


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def _remove_partial(out: Path, existed: bool) -> None:
    """Nothing half-written: the temporary siblings ``write_checkpoint`` makes, and the output itself
    if the group failed after rank 0 had moved it into place."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir()


def _failure(run: Path, nproc: int, returncode: int) -> Exception:
    """The first failed rank's error (the others usually fail after it, on the broken group)."""
    found = [json.loads(p.read_text()) for p in (run / ERRORS_DIR).glob("rank-*.json")]
    if not found:
        tail = (run / "launcher.log").read_text()[-2000:]
        return RankFailed(f"the {nproc} fitting processes failed (launcher exit {returncode}): {tail.strip()}")
    first = min(found, key=lambda e: e["time"])
    message = f"rank {first['rank']} of {nproc} failed: {first['message']}"
    cls = getattr(errors, first["type"], None)
    if isinstance(cls, type) and issubclass(cls, LigoError):
        return cls(message)  # the same kind (data_error, target_error, ...) as in one process
    return RankFailed(f"{message} ({first['type']})")


# --- one rank -------------------------------------------------------------------------------------

def rank_device(device: str | None, local_rank: int) -> str:
    """Rank ``r``'s device: ``cuda:r`` when CUDA is asked for (or auto and present), else the CPU."""
    import torch

    if device in (None, "auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    if device in (None, "auto"):
        return "cpu"
    return device


def _emit(event: dict) -> None:
    print(EVENT_PREFIX + json.dumps(event, default=str), flush=True)


def rank_main(run_dir: str) -> int:
    import torch
    import torch.distributed as dist

    from ligo_core.pipeline import grow

    run = Path(run_dir)
    job = json.loads((run / "job.json").read_text())
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    options = dict(job["options"])
    device = rank_device(options.pop("device", None), local_rank)
    error = run / ERRORS_DIR / f"rank-{rank}.json"
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
        try:
            grow(job["src"], job["target"], job["out_dir"], device=device,
                 progress=_emit if rank == 0 else None, **options)
        except BaseException as exc:
            _record(error, rank, exc)  # before the group closes: the others fail only after this
            raise
        finally:
            dist.destroy_process_group()
    except BaseException as exc:
        if not error.exists():
            _record(error, rank, exc)
        raise
    return 0


def _record(path: Path, rank: int, exc: BaseException) -> None:
    path.write_text(json.dumps({"rank": rank, "type": type(exc).__name__, "message": str(exc), "time": time.time()}))


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1]))
