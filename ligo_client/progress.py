"""Progress on stderr. On a terminal, one status line redrawn in place; otherwise (a CI log, an
Airflow task log) plain lines, one per event, with transfers and job progress printed only when
they move on by a step (10% of a transfer, a job stage) or every ``interval`` seconds."""

from __future__ import annotations

import sys
import time


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _percent(done: int, total: int) -> int:
    return 100 if total <= 0 else min(100, done * 100 // total)


def _job(e: dict) -> tuple[str, tuple]:
    job = e["job"]
    p = job.get("progress") or {}
    step, total, loss = p.get("step") or 0, p.get("total") or 0, p.get("loss")
    text = f"job {job.get('id')} {job.get('state')}"
    if job.get("stage") and job.get("state") == "running":
        text += f", {job['stage']}"
        if total:
            text += f" step {step}/{total}" + (f" loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
    if job.get("state") in ("succeeded", "failed", "cancelled"):
        return text, None
    return text, (job.get("state"), job.get("stage"), step * 10 // total if total else 0)


def _uploaded(e: dict) -> str:
    c = e["checkpoint"]
    where = "already on the service" if e.get("reused") else "uploaded"
    return (f"checkpoint {c.get('id')} {where}: {c.get('family')}, {c.get('num_parameters', 0):,} parameters, "
            f"{_size(c.get('size_bytes', 0))}")


# stage -> event -> (text, bucket). An event with a bucket is progress: redrawn on a terminal,
# printed in a log when its bucket changes; one without is a line of its own.
DESCRIBE = {
    "packing": lambda e: (f"packing {e['path']}", None),
    "uploading": lambda e: (f"uploading {_size(e['sent'])} / {_size(e['total'])} ({_percent(e['sent'], e['total'])}%)",
                            _percent(e["sent"], e["total"]) // 10),
    "resuming": lambda e: (f"resuming upload {e['upload']}: {e['parts_done']} of {e['parts']} parts already sent",
                           None),
    "uploaded": lambda e: (_uploaded(e), None),
    "submitted": lambda e: (f"job {e['job'].get('id')} "
                            f"{'found: same inputs as an earlier run' if e.get('reused') else 'submitted'} "
                            f"({e['job'].get('state')})", None),
    "job": _job,
    "downloading": lambda e: (f"downloading [{e['index']}/{e['count']}] {e['path']} {_size(e['received'])} / "
                              f"{_size(e['total'])}", (e["path"], _percent(e["received"], e["total"]) // 25)),
    "downloaded": lambda e: (f"downloaded {e['files']} files ({_size(e['bytes'])}), sizes and SHA-256 checked, "
                             f"to {e['out']}", None),
    "retrying": lambda e: (f"retrying {e['what']} in {e['delay']:.1f} s (attempt {e['attempt']}): {e['reason']}",
                           None),
}


class Display:
    def __init__(self, stream=None, live: bool | None = None, interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval
        self.started = time.monotonic()
        self.shown: dict[str, tuple] = {}  # frequent stage -> (bucket, when) last printed
        self.drawn = False

    def __call__(self, event: dict) -> None:
        describe = DESCRIBE.get(event.get("stage"))
        if describe is None:
            return
        text, bucket = describe(event)
        stage = event["stage"]
        if bucket is not None:
            if self.live:
                self._draw(text)
                return
            now, last = time.monotonic(), self.shown.get(stage)
            if last is not None and last[0] == bucket and now - last[1] < self.interval:
                return
            self.shown[stage] = (bucket, now)
        self.line(text)

    def _draw(self, text: str) -> None:
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.drawn = True

    def line(self, text: str) -> None:
        if self.live:
            self.stream.write(("\r\x1b[K" if self.drawn else "") + text + "\n")
            self.drawn = False
        else:
            self.stream.write(f"[{time.monotonic() - self.started:7.1f}s] {text}\n")
        self.stream.flush()
