"""The King James Bible as real text for distillation and evaluation, with a fixed held-out split.

The text comes from the Debian ``bible`` program (package ``bible-kjv``; public domain, 31,102
verses, about 4.3 MB): ``bible Gen1:1-Rev22:21`` prints every chapter as a heading line
(``"Genesis 1"``) followed by numbered verses, wrapped at 80 columns. Nothing is downloaded; without
the program, :func:`read_verses` raises a :class:`~mmdistill.errors.DataError` saying how to
install it.

**Split.** By whole books, so held-out text shares no verse, chapter or narrative with the
training text: every tenth book of the canonical order starting with the eighth is held out,
:data:`HELD_OUT_BOOKS` = Ruth, Job, Hosea, Zechariah, Galatians, Hebrews (narrative, poetry,
prophecy and epistle; 2,015 verses, 221K characters, 5% of the text, 54,675 SmolLM2 tokens). The
other 60 books are the training split. The split depends only on the book names, never on a seed.

Typical use::

    paths = write_kjv_split("runs/kjv")          # train.txt, heldout.txt, manifest.json
    # mmdistill eval --student S --teacher T --data runs/kjv/heldout.txt --max-tokens 32768
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..files import atomic_write_text

__all__ = [
    "BOOKS",
    "HELD_OUT_BOOKS",
    "SPLITS",
    "Verse",
    "read_verses",
    "split_verses",
    "verses_to_text",
    "write_kjv_split",
]

BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians",
    "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians",
    "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
)  # fmt: skip
"""The 66 books in canonical order, named as the ``bible`` program prints them."""

HELD_OUT_BOOKS: tuple[str, ...] = tuple(BOOKS[i] for i in range(7, len(BOOKS), 10))
"""Held-out books: every tenth book from the eighth (Ruth, Job, Hosea, Zechariah, Galatians,
Hebrews)."""

SPLITS: tuple[str, ...] = ("train", "heldout")
_FULL_RANGE = "Gen1:1-Rev22:21"
_INSTALL_HINT = "install it with `apt-get install bible-kjv` (Debian/Ubuntu)"


@dataclass(frozen=True)
class Verse:
    """One verse.

    Attributes:
        book: book name as in :data:`BOOKS`.
        chapter: chapter number (from 1).
        verse: verse number (from 1).
        text: the verse, wrapped lines joined by single spaces.
    """

    book: str
    chapter: int
    verse: int
    text: str


def parse_bible_output(text: str) -> list[Verse]:
    """Parse the output of ``bible RANGE`` into verses.

    A chapter is a heading line (``"<book> <chapter>"`` after a blank line), then lines starting
    with spaces and a verse number; a verse's wrapped lines start in column 0.

    Args:
        text: the program's standard output.

    Returns:
        The verses in order.

    Raises:
        DataError: if the text does not look like ``bible`` output.
    """
    verses: list[Verse] = []
    book, chapter = None, 0
    number, parts = 0, []
    previous_blank = True

    def flush() -> None:
        if parts:
            verses.append(Verse(book, chapter, number, " ".join(parts)))
            parts.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            previous_blank = True
            continue
        start = re.match(r"^\s+(\d+)\s+(.*)$", line)
        heading = re.match(r"^(\S.*?) (\d+)$", line) if previous_blank else None
        previous_blank = False
        if heading and not line[0].isspace():
            flush()
            book, chapter = heading.group(1), int(heading.group(2))
        elif start:
            if book is None:
                raise DataError("unexpected `bible` output: a verse before any chapter heading")
            flush()
            number, parts[:] = int(start.group(1)), [start.group(2).strip()]
        elif parts:
            parts.append(line.strip())
        else:
            raise DataError(f"unexpected `bible` output line: {line!r}")
    flush()
    return verses


def read_verses(program: str = "bible") -> list[Verse]:
    """All 31,102 verses of the KJV from the ``bible`` program.

    Args:
        program: the program's name or path.

    Returns:
        The verses in canonical order.

    Raises:
        DataError: if the program is missing or fails, or its output has an unknown book.
    """
    exe = shutil.which(program)
    if exe is None:
        raise DataError(f"the KJV text needs the `{program}` program; {_INSTALL_HINT}")
    try:
        result = subprocess.run(
            [exe, _FULL_RANGE], check=True, capture_output=True, text=True, timeout=120
        )
    except (subprocess.SubprocessError, OSError) as exc:
        raise DataError(f"`{program} {_FULL_RANGE}` failed: {exc}") from exc
    verses = parse_bible_output(result.stdout)
    unknown = sorted({v.book for v in verses} - set(BOOKS))
    if unknown:
        raise DataError(f"`{program}` printed unknown book names {unknown}")
    return verses


def split_verses(
    verses: Iterable[Verse], held_out_books: Sequence[str] = HELD_OUT_BOOKS
) -> dict[str, list[Verse]]:
    """Split verses by book into ``"train"`` and ``"heldout"`` (order kept).

    Args:
        verses: verses from :func:`read_verses`.
        held_out_books: books of the held-out split.

    Returns:
        ``{"train": [...], "heldout": [...]}``.

    Raises:
        ValueError: if a held-out book name is not in :data:`BOOKS`.
    """
    unknown = sorted(set(held_out_books) - set(BOOKS))
    if unknown:
        raise ValueError(f"unknown book names {unknown}; see mmdistill.data.kjv.BOOKS")
    held = set(held_out_books)
    out: dict[str, list[Verse]] = {"train": [], "heldout": []}
    for v in verses:
        out["heldout" if v.book in held else "train"].append(v)
    return out


def verses_to_text(verses: Iterable[Verse]) -> str:
    """Plain text: one verse per line, a blank line between chapters (no headings or numbers)."""
    lines: list[str] = []
    last = None
    for v in verses:
        if last is not None and (v.book, v.chapter) != last:
            lines.append("")
        lines.append(v.text)
        last = (v.book, v.chapter)
    return "\n".join(lines) + "\n" if lines else ""


def write_kjv_split(
    out_dir: str | Path,
    held_out_books: Sequence[str] = HELD_OUT_BOOKS,
    program: str = "bible",
) -> dict[str, Path]:
    """Write ``train.txt`` and ``heldout.txt`` (see :func:`verses_to_text`) and a manifest.

    Existing files are reused when the manifest records the same held-out books.

    Args:
        out_dir: output directory (created if missing).
        held_out_books: books of the held-out split.
        program: the ``bible`` program.

    Returns:
        Paths keyed ``"train"``, ``"heldout"`` and ``"manifest"``.
    """
    out = Path(out_dir)
    paths = {"train": out / "train.txt", "heldout": out / "heldout.txt"}
    paths["manifest"] = out / "manifest.json"
    if paths["manifest"].exists() and all(p.exists() for p in paths.values()):
        try:
            manifest = json.loads(paths["manifest"].read_text())
        except json.JSONDecodeError:
            manifest = {}
        if manifest.get("held_out_books") == list(held_out_books):
            return paths
    parts = split_verses(read_verses(program), held_out_books)
    out.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        atomic_write_text(paths[name], verses_to_text(parts[name]))
    manifest = {
        "source": f"bible {_FULL_RANGE} (Debian bible-kjv)",
        "held_out_books": list(held_out_books),
        "verses": {name: len(parts[name]) for name in SPLITS},
        "characters": {name: paths[name].stat().st_size for name in SPLITS},
    }
    atomic_write_text(paths["manifest"], json.dumps(manifest, indent=2) + "\n")
    return paths
