"""Checkpoint validation in a separate process, so the API process never loads weights.

``ligo_core.inspect_checkpoint`` reads the whole model (to count parameters and check that
the weights match the config), which takes memory the size of the checkpoint and loads
torch. A small pool of long-lived child processes (``python -m app.validator``) does it
instead: one JSON request per line on stdin, one JSON answer per line on stdout. A child
that crashes or runs past the time limit is killed and replaced.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)  # so `python -m app.validator` finds us


class ValidationFailed(Exception):
    """The checkpoint is not acceptable; the message is one line for the user."""


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
            sys.executable, "-m", "app.validator", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
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
    def __init__(self, size: int, timeout: float, tmp_dir: Path):
        self.size, self.timeout, self.tmp_dir = size, timeout, tmp_dir
        self._idle: asyncio.Queue[_Child | None] | None = None

    async def _queue(self) -> asyncio.Queue:
        if self._idle is None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
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
                answer = await child.ask({"path": str(path)}, self.timeout)
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
            raise ValidationFailed(answer["error"])
        raise ValidatorUnavailable(answer.get("error", "validator error"))

    async def close(self) -> None:
        if self._idle is None:
            return
        while not self._idle.empty():
            child = self._idle.get_nowait()
            if child is not None:
                await child.kill()


def main() -> None:
    import ligo_core

    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not corrupt the protocol
    for line in sys.stdin:
        try:
            request = json.loads(line)
            info = ligo_core.inspect_checkpoint(request["path"])
            answer = {"ok": True, "info": json.loads(json.dumps(info, default=str))}
        except ligo_core.LigoError as exc:
            answer = {"ok": False, "kind": "invalid", "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        except MemoryError:
            answer = {"ok": False, "kind": "invalid", "error": "the checkpoint is too large to check in memory"}
        except Exception as exc:  # a bug or an unforeseen file: report it, keep serving
            answer = {"ok": False, "kind": "invalid", "error": f"could not read the checkpoint ({type(exc).__name__}: {exc})"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
