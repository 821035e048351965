"""Writing result tables: ``<folder>/<stem>.csv`` and ``<folder>/<stem>.md``, atomically (the study writes
to ``cfg.results_path()``, see :func:`cmbfe.study.runs.save_table`).

Every table cmbfe writes puts this run's numbers beside the paper's (Li et al. 2021, private data),
in columns labelled ``"... (this run)"`` and ``"... (paper, private data)"`` (see :mod:`cmbfe.study.paper`);
a paper number is never presented as a result of this run, and a run number never as the paper's.
Stages build a :class:`pandas.DataFrame` that way and call :func:`write_table`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cmbfe.utils import atomic_write_text


def write_table(df: pd.DataFrame, stem: str, results_dir: str | Path, *, caption: str = "") -> Path:
    """Write ``df`` as ``<results_dir>/<stem>.csv`` (no index) and ``<stem>.md`` (caption, then a
    Markdown table, empty cells for missing values, floats to 3 decimals); both atomic. Returns the CSV
    path."""
    out = Path(results_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"{stem}.csv"
    atomic_write_text(csv_path, df.to_csv(index=False))
    md = df.astype(object).where(df.notna(), "").to_markdown(index=False, floatfmt=".3f")
    text = f"{caption.strip()}\n\n{md}\n" if caption.strip() else f"{md}\n"
    atomic_write_text(out / f"{stem}.md", text)
    return csv_path
