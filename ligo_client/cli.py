"""``ligo remote``: grow on a ligo service from a pipeline step, in one command.

    ligo remote grow SRC --target T --out DIR [--server URL] [--key KEY]
    ligo remote status JOB [--wait]     ligo remote download JOB DIR     ligo remote cancel JOB

Exit codes a pipeline can branch on: 0 done, 1 the service could not be reached or failed,
2 bad input, 3 the job failed, 4 the job was cancelled, 5 timed out waiting. Also runs as
``python -m ligo_client ...`` where only httpx is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ligo_client.client import DEFAULT_SERVER, Client
from ligo_client.errors import BadInput, JobCancelled, JobFailed, JobTimeout, LigoClientError
from ligo_client.progress import Display

# first match wins: JobTimeout is also a TimeoutError, hence an OSError
EXIT_CODES = ((JobTimeout, 5), (JobCancelled, 4), (JobFailed, 3), (BadInput, 2), (LigoClientError, 1), (OSError, 1))
STATE_EXIT = {"failed": 3, "cancelled": 4}  # `status` of a job that ended badly

# flag, type, (section of the job request, field), help; None as section: a top-level field
JOB_OPTIONS = (
    ("--strategy", str, (None, "strategy"), "ligo (default), stack, interpolate, net2net or preserve; e.g. stack"),
    ("--seed", int, (None, "seed"), "random seed (default 0); e.g. 1"),
    ("--fit-steps", int, ("fit", "steps"), "operator fitting steps for 'ligo' (service default 100); e.g. 25"),
    ("--batch-size", int, ("fit", "batch_size"), "fitting batch size; e.g. 16"),
    ("--seq-len", int, ("fit", "seq_len"), "fitting sequence length; e.g. 128"),
    ("--lr", float, ("fit", "lr"), "peak fitting learning rate; e.g. 1e-4"),
    ("--data-uri", str, ("fit", "data_uri"),
     "s3:// .txt or .jsonl corpus to fit on (default: the shipped corpus); e.g. s3://corpora/wiki.txt"),
    ("--spread", float, ("growth", "spread"), "move copied units apart, 0-4 (default: the strategy's); e.g. 2"),
    ("--noise", float, ("growth", "noise"), "symmetry breaking between copies, 0-1 (default 1); e.g. 0.5"),
    ("--ligo-init", str, ("growth", "ligo_init"), "where LiGO's fit starts: preserve, stack or interpolate; e.g. stack"),
    ("--tokens", int, ("plan", "tokens"), "tokens the grown model will train on (for the estimate); e.g. 2000000000"),
    ("--gpu", str, ("plan", "gpu"), "accelerator of the estimate (default H100); e.g. A100"),
    ("--price", float, ("plan", "price_per_gpu_hour"), "USD per GPU-hour of the estimate; e.g. 2.5"),
    ("--utilisation", float, ("plan", "utilisation"), "model FLOPs utilisation of the estimate; e.g. 0.4"),
    ("--callback-url", str, (None, "callback_url"),
     "URL the service POSTs the finished job to; e.g. https://ci.example.com/hooks/ligo"),
)


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {value!r}")
    return seconds


def _example(command: str) -> str:
    return f"example:\n  {command}"


def add_parser(subparsers) -> argparse.ArgumentParser:
    remote = subparsers.add_parser("remote", help="grow on a ligo service: upload, wait, download verified",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=_example("ligo remote grow ./small --target gpt2-medium --out ./grown"))
    add_commands(remote)
    return remote


def add_commands(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help=f"service URL (default: LIGO_SERVER, else {DEFAULT_SERVER}); "
                                         "e.g. https://ligo.internal")
    common.add_argument("--key", help="API key (default: LIGO_API_KEY; the environment keeps it out of logs); "
                                      "e.g. ligo_...")
    common.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout")
    common.add_argument("--quiet", action="store_true", help="no progress on stderr")
    sub = parser.add_subparsers(dest="remote_command", required=True)

    g = sub.add_parser("grow", parents=[common], help="upload SRC, grow it, wait, download the grown model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_example("ligo remote grow ./small --target layers=24,hidden=1024 --out ./grown "
                                       "--strategy ligo --timeout 7200"))
    g.add_argument("src", help="model directory, a .tar/.tar.gz/.tgz/.zip of one, a .safetensors file "
                               "(config.json beside it), or the id of a checkpoint already uploaded")
    g.add_argument("--target", required=True, help="preset name or fields; e.g. layers=12,hidden=768,heads=12,ffn=3072")
    g.add_argument("--out", required=True, help="output directory (must not exist or be empty); e.g. ./grown")
    for flag, kind, _where, text in JOB_OPTIONS:
        g.add_argument(flag, type=kind, dest=_dest(flag), help=text)
    g.add_argument("--timeout", type=_seconds, help="give up waiting after this many seconds (exit 5; the job "
                                                    "goes on, and running the command again picks it up); e.g. 7200")
    g.add_argument("--idempotency-key", help="use this key instead of one derived from the inputs (a new key "
                                             "makes a new job even for the same inputs); e.g. the pipeline's run id")
    g.set_defaults(func=_run(cmd_grow))

    s = sub.add_parser("status", parents=[common], help="show a job (exit 3 failed, 4 cancelled)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_example("ligo remote status 0193a4c2e8f1... --wait --timeout 3600"))
    s.add_argument("job", help="the job's id")
    s.add_argument("--wait", action="store_true", help="wait until the job ends")
    s.add_argument("--timeout", type=_seconds, help="with --wait: give up after this many seconds (exit 5); e.g. 3600")
    s.set_defaults(func=_run(cmd_status))

    d = sub.add_parser("download", parents=[common], help="download a succeeded job's files, verified",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_example("ligo remote download 0193a4c2e8f1... ./grown"))
    d.add_argument("job", help="the job's id")
    d.add_argument("dir", help="output directory (must not exist or be empty)")
    d.set_defaults(func=_run(cmd_download))

    c = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_example("ligo remote cancel 0193a4c2e8f1..."))
    c.add_argument("job", help="the job's id")
    c.set_defaults(func=_run(cmd_cancel))


def _run(command):
    def run(args) -> int:
        try:
            return command(args)
        except (LigoClientError, OSError) as exc:  # OSError: the local disk (full, not writable)
            code = next(c for cls, c in EXIT_CODES if isinstance(exc, cls))
            print(f"ligo remote: {'error: ' if code <= 2 else ''}{exc}", file=sys.stderr)
            if isinstance(exc, JobTimeout):
                job = exc.job.get("id")
                print(f"ligo remote: run the same command again to pick the job up, `ligo remote status {job} "
                      f"--wait` to follow it, or `ligo remote cancel {job}`", file=sys.stderr)
            if args.json and getattr(exc, "job", None):
                print(json.dumps({"job": exc.job}, indent=2))
            return code

    return run


def _client(args) -> Client:
    display = None if args.quiet else Display(sys.stderr)
    return Client(args.server, args.key or os.environ.get("LIGO_API_KEY"), on_event=display)


def _job_request(args) -> dict:
    request: dict = {}
    for flag, _kind, (section, field), _text in JOB_OPTIONS:
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        if section is None:
            request[field] = value
        else:
            request.setdefault(section, {})[field] = value
    return request


def _summary(job: dict) -> str:
    p = job.get("progress") or {}
    text = f"{job['id']} {job['state']}"
    if job.get("stage"):
        text += f" ({job['stage']}" + (f", step {p.get('step')}/{p['total']}" if p.get("total") else "") + ")"
    if job.get("error"):
        text += f": {job['error'].get('type')}: {job['error'].get('detail')}"
    return text


def cmd_grow(args) -> int:
    from ligo_client.download import check_destination

    out = Path(args.out)
    check_destination(out)  # before any upload or GPU time
    src = Path(args.src).expanduser()
    with _client(args) as client:
        job = client.grow(src if src.exists() else args.src, args.target, timeout=args.timeout,
                          idempotency_key=args.idempotency_key, **_job_request(args))
        client.download(job, out)
    if args.json:
        print(json.dumps({"job": job, "out": str(out)}, indent=2))
    else:
        print(f"job {job['id']} succeeded; the grown model is in {out}")
    return 0


def cmd_status(args) -> int:
    with _client(args) as client:
        job = client.wait(args.job, timeout=args.timeout) if args.wait else client.job(args.job)
    print(json.dumps(job, indent=2) if args.json else _summary(job))
    return STATE_EXIT.get(job["state"], 0)


def cmd_download(args) -> int:
    with _client(args) as client:
        out = client.download(args.job, args.dir)
    print(json.dumps({"job": args.job, "out": str(out)}) if args.json else f"downloaded job {args.job} to {out}")
    return 0


def cmd_cancel(args) -> int:
    with _client(args) as client:
        job = client.cancel(args.job)
    print(json.dumps(job, indent=2) if args.json else f"cancel requested: {_summary(job)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ligo_client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ligo remote: interrupted (the job, if any, goes on; run the command again to pick it up)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
