"""Reader for SWORD zText Bible modules (e.g. Debian ``sword-text-kjv``), no libsword needed.

A zText module directory holds, per testament (``ot``, ``nt``), three files (DATA.md §A1.2):

* ``<t>.bzs`` block index: 12-byte little-endian records ``(offset, compressed size,
  uncompressed size)`` (u32 each) into ``<t>.bzz``;
* ``<t>.bzz`` the zlib-compressed blocks of OSIS XML;
* ``<t>.bzv`` verse index: 10-byte records ``(block u32, start u32, size u16)``, one per
  versification slot. Empty slots and heading-only slots mark books and chapters; a chapter
  slot contains ``<chapter ... osisID="Gen.1" .../>``.
"""
from __future__ import annotations

import os
import re
import struct
import zlib
from typing import NamedTuple

__all__ = ["KJV_MODULE_DIR", "read_ztext", "clean_osis", "Chapter", "read_chapters"]

KJV_MODULE_DIR = "/usr/share/sword/modules/texts/ztext/engKJV2006eb"

_CHAPTER = re.compile(r'<chapter [^>]*osisID="([^"]+)"[^>]*>')


def read_ztext(module_dir: str | os.PathLike, testament: str) -> list[str]:
    """Raw OSIS text of every versification slot of one testament.

    Parameters
    ----------
    module_dir : path
        Directory holding ``ot.bz*`` and ``nt.bz*``.
    testament : {"ot", "nt"}

    Returns
    -------
    list of str
        One string per slot ('' for empty slots), in versification order.
    """
    if testament not in ("ot", "nt"):
        raise ValueError(f"testament must be 'ot' or 'nt', got {testament!r}")

    def read(ext: str) -> bytes:
        with open(os.path.join(module_dir, f"{testament}.{ext}"), "rb") as f:
            return f.read()

    bzs, bzz, bzv = read("bzs"), read("bzz"), read("bzv")
    blocks = [zlib.decompress(bzz[off:off + size]) for off, size, _ in struct.iter_unpack("<III", bzs)]
    return [blocks[b][start:start + n].decode("utf-8") if n else ""
            for b, start, n in struct.iter_unpack("<IIH", bzv)]


def clean_osis(text: str) -> str:
    """Plain text of an OSIS fragment: notes and titles removed, tags stripped, spaces squeezed."""
    # Some modules glue adjacent word elements together; keep a space between them.
    text = re.sub(r"(</w>|</transChange>)(?=<(w|transChange)\b)", r"\1 ", text)
    text = re.sub(r"<note\b.*?</note>|<title\b.*?</title>", "", text, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", text)).strip()


class Chapter(NamedTuple):
    """One chapter of a Bible module."""
    osis_id: str    # e.g. "Gen.1"
    book: str       # e.g. "Gen"
    testament: str  # "ot" or "nt"
    text: str       # plain text of its verses, separated by spaces


def read_chapters(module_dir: str | os.PathLike = KJV_MODULE_DIR) -> list[Chapter]:
    """Every chapter of a zText module, in canonical order.

    The current chapter is tracked with the ``<chapter osisID=...>`` marker; the text of each
    following slot (cleaned with :func:`clean_osis`) is appended to it. Text before a marker
    in the same slot stays with the previous chapter.

    Raises
    ------
    FileNotFoundError
        When the module is missing, with the apt command that installs the KJV.
    """
    module_dir = os.fspath(module_dir)
    if not os.path.exists(os.path.join(module_dir, "ot.bzv")):
        raise FileNotFoundError(f"no SWORD zText module in {module_dir}: install the KJV with "
                                "'apt-get install -y sword-text-kjv'")
    chapters: list[Chapter] = []
    for testament in ("ot", "nt"):
        current, parts = None, []
        for raw in read_ztext(module_dir, testament):
            match = None
            for match in _CHAPTER.finditer(raw):
                pass  # keep the last marker of the slot
            if match is not None:
                if current is not None:
                    head = clean_osis(raw[:match.start()])
                    chapters.append(_chapter(current, testament, parts + [head]))
                current, parts = match.group(1), [clean_osis(raw[match.end():])]
            elif current is not None:
                parts.append(clean_osis(raw))
        if current is not None:
            chapters.append(_chapter(current, testament, parts))
    return chapters


def _chapter(osis_id: str, testament: str, parts: list[str]) -> Chapter:
    return Chapter(osis_id, osis_id.split(".")[0], testament, " ".join(p for p in parts if p))
