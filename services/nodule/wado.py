"""WADO-RS instance retrieval (DICOM PS3.18 10.4): content negotiation and the response body.

An instance is answered as ``multipart/related; type="application/dicom"`` (one part), the
default, or as a single ``application/dicom`` body when the client's Accept prefers it; a series
as ``multipart/related`` with one part per instance. The
``transfer-syntax`` parameter of a media range is honoured as far as this service can without
transcoding: ``*`` or the stored instance's own transfer syntax is acceptable, any other one is
not (406 when no acceptable range is left). Without the parameter the stored transfer syntax is
served and named in the part's Content-Type; PS3.18 makes Explicit VR Little Endian the default,
which every result object and every uncompressed received instance already is, but a
compressed received instance is served as received rather than transcoded.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info

DICOM = "application/dicom"
MULTIPART = "multipart/related"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


@dataclass(frozen=True)
class MediaRange:
    """One range of an Accept header: type, parameters (lower-case names), quality."""

    media_type: str
    parameters: dict[str, str]
    quality: float


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an Accept header, best first (no header: anything)."""
    ranges = []
    for item in (header or "*/*").split(","):
        pieces = [piece.strip() for piece in item.split(";") if piece.strip()]
        if not pieces:
            continue
        parameters = {}
        for piece in pieces[1:]:
            name, _, value = piece.partition("=")
            parameters[name.strip().lower()] = value.strip().strip('"')
        quality = _quality(parameters.pop("q", "1"))
        ranges.append(MediaRange(pieces[0].lower(), parameters, quality))
    return sorted((r for r in ranges if r.quality > 0), key=lambda r: -r.quality)


def _quality(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def choose_representation(header: str | None, transfer_syntax: str) -> str | None:
    """``"multipart"``, ``"single"``, or None when no acceptable range fits the stored instance."""
    for media in parse_accept(header):
        syntax = media.parameters.get("transfer-syntax", "*")
        if syntax not in ("*", transfer_syntax):
            continue
        if media.media_type in ("*/*", "multipart/*") or (
                media.media_type == MULTIPART and media.parameters.get("type", DICOM).lower() == DICOM):
            return "multipart"
        if media.media_type in (DICOM, "application/*"):
            return "single"
    return None


def stored_transfer_syntax(path: Path) -> str:
    """The transfer syntax in a Part 10 file's meta information."""
    return str(read_file_meta_info(path).TransferSyntaxUID)


def multipart_body(contents: list[tuple[bytes, str]]) -> tuple[bytes, str]:
    """Instances (bytes, transfer syntax) as a ``multipart/related; type="application/dicom"`` body;
    (body, content type)."""
    boundary = f"tessera-{uuid.uuid4().hex}"
    parts = [(f"--{boundary}\r\nContent-Type: {DICOM}; transfer-syntax={syntax}\r\n"
              f"Content-Length: {len(content)}\r\n\r\n").encode() + content + b"\r\n"
             for content, syntax in contents]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'{MULTIPART}; type="{DICOM}"; boundary={boundary}'
