"""Upload bodies: the raw request body, or the ``file`` part of a ``multipart/form-data`` form.

``curl -F file=@model.tar.gz``, ``requests.post(files=...)`` and HTML forms send a form; the
service's own clients send the raw file. Either way ``POST /v1/checkpoints`` gets the file's
bytes as they arrive and streams them to storage under its size cap, with its hash and checks.
The form is parsed with python-multipart's push parser, chunk by chunk: Starlette's
``request.form()`` would first spool the whole file to disk, with no cap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.problems import Problem, field_problem

FILE_FIELD = "file"
# Bytes of a form outside its file (boundaries, part headers, other fields): a form is a
# wrapper here, so anything bigger is refused before it costs memory.
MAX_FORM_OVERHEAD = 64 * 1024


@dataclass
class UploadBody:
    chunks: AsyncIterator[bytes]  # the file's bytes, as they arrive
    filename: str | None  # the form part's file name; a raw body has none
    field: str  # what a problem with the content names: "body" or "file"
    empty_message: str


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def upload_body(request: Request) -> UploadBody:
    """The file of the request; for a form, read up to the start of its ``file`` part."""
    if not is_form(request):
        return UploadBody(request.stream(), None, "body",
                          "the request body is empty; send the file as the raw body")
    form = _StreamedForm(request)
    await form.read_until_file()
    return UploadBody(form.file_chunks(), form.filename, FILE_FIELD, "the form's `file` part is empty")


def filename_of(query_filename: str | None, body: UploadBody) -> str:
    """``?filename=`` wins; else the form part's own file name."""
    name = query_filename or body.filename
    if not name:
        raise field_problem("filename", "name the file: ?filename=model.tar.gz, or a multipart form whose "
                                        "`file` part has a filename (curl -F file=@model.tar.gz)")
    return name


class _StreamedForm:
    """python-multipart's callbacks collect the ``file`` part's bytes; other parts are skipped."""

    def __init__(self, request: Request):
        _, options = parse_options_header(request.headers.get("content-type", ""))
        boundary = options.get(b"boundary")
        if not boundary:
            raise field_problem("Content-Type", "multipart/form-data needs a boundary parameter")
        self.stream = request.stream().__aiter__()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        })
        self.pending: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}
        self.name, self.value = bytearray(), bytearray()
        self.filename: str | None = None
        self.in_file = self.file_seen = self.ended = False
        self.read = self.file_bytes = 0

    # -- parser callbacks
    def _part_begin(self) -> None:
        self.headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        self.headers[bytes(self.name).lower()] = bytes(self.value)
        self.name, self.value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        if options.get(b"name", b"").decode("utf-8", "replace") != FILE_FIELD:
            return
        if self.file_seen:
            raise field_problem(FILE_FIELD, "the form has more than one `file` part; send one checkpoint")
        self.in_file = self.file_seen = True
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace") or None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.pending.append(data[start:end])
            self.file_bytes += end - start

    def _part_end(self) -> None:
        self.in_file = False

    def _end(self) -> None:
        self.ended = True

    # -- reading
    async def _feed(self) -> bool:
        """Parse the next chunk of the body; False once the body has ended."""
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            return False
        self.read += len(chunk)
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            raise field_problem(FILE_FIELD, f"not a valid multipart/form-data body: {exc}") from None
        if self.read - self.file_bytes > MAX_FORM_OVERHEAD:
            raise Problem(413, "too-large", f"the form has over {MAX_FORM_OVERHEAD} bytes besides its `file` part")
        return True

    async def read_until_file(self) -> None:
        while not self.file_seen:
            if self.ended or not await self._feed():
                raise field_problem(FILE_FIELD, "the form has no `file` part: send the checkpoint as the "
                                                "form field `file` (curl -F file=@model.tar.gz)")

    async def file_chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self.pending:
                data = b"".join(self.pending)
                self.pending.clear()
                yield data
            if self.ended:
                return
            if not await self._feed():
                raise field_problem(FILE_FIELD, "the form ends before its closing boundary: the upload was cut off")
