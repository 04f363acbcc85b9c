"""Checkpoint validation in a separate process, so the API process never loads weights.

A small pool of long-lived child processes (``python -m app.validator``) extracts each
archive into the data directory's temp space (``ligo_core.archive``: model files only, size
and expansion caps), bounds ``config.json`` before anything is built from it (``precheck``),
then runs ``ligo_core.inspect_checkpoint``: one JSON request per line on stdin, one JSON
answer per line on stdout. A child that crashes or runs past the time limit is killed and
replaced. Answers carry the checkpoint's own message, never an allocator's or a server path.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import tempfile
from pathlib import Path, PurePath

from app import scratch

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)  # so `python -m app.validator` finds us


class ValidationFailed(Exception):
    """The checkpoint is not acceptable; the message is one line for the user, ``field`` the
    config value at fault when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def scrub(message: str, roots: list[Path]) -> str:
    """The message with every path under the server's own folders cut to its file name."""
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        message = re.sub(re.escape(root) + r"[^\s'\"(),:;]*", lambda m: PurePath(m.group()).name, message)
    return message


class ValidatorUnavailable(Exception):
    """The validator process failed (crash, time-out): not the checkpoint's fault, or not provably."""


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    @classmethod
    async def start(cls, tmp_dir: Path) -> _Child:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_dir), TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH")])))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.validator", str(tmp_dir), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=env, limit=64 * 2**20,
        )
        return cls(proc)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def ask(self, request: dict, timeout: float) -> dict:
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise ValidatorUnavailable("the validator process exited")
        return json.loads(line)

    async def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        await self.proc.wait()


class Validator:
    """``max_bytes``: what an archive may expand to; ``private_roots``: the server's folders, never
    named in an answer."""

    def __init__(self, size: int, timeout: float, tmp_dir: Path, max_bytes: int, private_roots: list[Path]):
        self.size, self.timeout, self.tmp_dir, self.max_bytes = size, timeout, tmp_dir, max_bytes
        self.private_roots = [tmp_dir, *private_roots, Path(tempfile.gettempdir())]
        self._idle: asyncio.Queue[_Child | None] | None = None

    async def _queue(self) -> asyncio.Queue:
        if self._idle is None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            scratch.sweep(self.tmp_dir, ("validate-", "ligo-src-"))  # what killed children left
            self._idle = asyncio.Queue()
            for _ in range(self.size):
                self._idle.put_nowait(None)  # started on first use
        return self._idle

    async def inspect(self, path: Path) -> dict:
        queue = await self._queue()
        child = await queue.get()
        try:
            if child is None or not child.alive:
                child = await _Child.start(self.tmp_dir)
            try:
                answer = await child.ask({"path": str(path), "max_bytes": self.max_bytes}, self.timeout)
            except (asyncio.TimeoutError, ValidatorUnavailable, BrokenPipeError, ConnectionResetError) as exc:
                await child.kill()
                child = None
                if isinstance(exc, asyncio.TimeoutError):
                    raise ValidationFailed(f"checking the checkpoint took longer than {self.timeout:.0f} s") from None
                raise ValidatorUnavailable("the checkpoint validator stopped unexpectedly") from None
        finally:
            queue.put_nowait(child)
        if answer.get("ok"):
            return answer["info"]
        if answer.get("kind") == "invalid":
            raise ValidationFailed(scrub(answer["error"], self.private_roots), answer.get("field"))
        raise ValidatorUnavailable("validator error")

    async def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            child = self._idle.get_nowait()
            if child is not None:
                await child.kill()


ALLOCATOR_WORDS = ("allocate", "out of memory")


def precheck(directory: Path) -> None:
    """Bound config.json's sizes on the raw JSON, before transformers builds a config object
    from it (Qwen2's makes a list with an entry per layer): a 422 naming the field."""
    from app import limits
    from ligo_core.checkpoint import MAX_JSON_BYTES

    path = directory / "config.json"
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_JSON_BYTES:
        return  # inspect_checkpoint names the problem
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return
    if isinstance(config, dict):
        limits.check_sizes(config, "config.json")


def check(request: dict, tmp_dir: Path) -> dict:
    """The checkpoint's description (ligo_core.inspect_checkpoint), an archive extracted into ``tmp_dir``."""
    import ligo_core
    from ligo_core.checkpoint import opened_source

    with opened_source(request["path"], max_bytes=request["max_bytes"], tmp_dir=tmp_dir) as directory:
        precheck(directory)
        return ligo_core.inspect_checkpoint(directory)


def main() -> None:
    import traceback

    import ligo_core
    from app.limits import OutOfBounds

    # This process's scratch folder, locked while it lives (app.scratch): a killed child's is swept.
    work, _lock = scratch.claim(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()), "validate-")
    tempfile.tempdir = str(work)
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        try:
            request = json.loads(line)
            answer = {"ok": True, "info": json.loads(json.dumps(check(request, work), default=str))}
        except OutOfBounds as exc:
            answer = {"ok": False, "kind": "invalid", "error": exc.message, "field": exc.field}
        except ligo_core.LigoError as exc:  # the checkpoint's own message: what is wrong with it
            answer = {"ok": False, "kind": "invalid", "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        except Exception as exc:  # an allocator failure, a bug, an unforeseen file: keep serving, say little
            traceback.print_exc()  # the operator's log has the whole story
            too_big = isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in ALLOCATOR_WORDS)
            answer = {"ok": False, "kind": "invalid", "error": "the checkpoint is too large to check in memory"
                      if too_big else f"could not read the checkpoint ({type(exc).__name__})"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
