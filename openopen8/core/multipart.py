"""A multipart/form-data body that streams its files from disk."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

CHUNK = 256 * 1024


@dataclass(frozen=True)
class UploadPart:
    """A file sent in a multipart body, read from its (seekable, local) file as the body streams out."""

    field: str
    filename: str
    file: IO[bytes]
    content_type: str


class MultipartBody:
    """The body of ``form`` fields and ``files``, with its length known up front, so an upload is never held whole in
    memory on its way to a provider."""

    def __init__(self, form: dict[str, str], files: tuple[UploadPart, ...]) -> None:
        self.boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        self._parts: list[bytes | UploadPart] = []
        for name, value in form.items():
            self._parts.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"'
                               f"\r\n\r\n{value}\r\n".encode())
        for part in files:
            self._parts.append(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{_quote(part.field)}"; '
                               f'filename="{_quote(part.filename)}"\r\nContent-Type: {part.content_type}\r\n\r\n'
                               .encode())
            self._parts.extend([part, b"\r\n"])
        self._parts.append(f"--{self.boundary}--\r\n".encode())

    def __len__(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.file.seek(0, io.SEEK_END) for p in self._parts)

    def __iter__(self) -> Iterator[bytes]:
        for part in self._parts:
            if isinstance(part, bytes):
                yield part
                continue
            part.file.seek(0)
            while chunk := part.file.read(CHUNK):
                yield chunk


def _quote(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")
