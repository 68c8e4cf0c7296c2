"""mkdocs hook: a tolerant nav for the guides.

Engineers add pages under ``docs/guides/``; each one that the ``nav`` of ``mkdocs.yml`` does
not list yet is appended to the *Guides* section (titled by its first heading), and a nav entry
whose file does not exist is dropped with a log line, so neither a new guide nor one still to
be merged breaks ``mkdocs build --strict``.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.guides")


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").capitalize()


def _pages(entries) -> set[str]:
    out: set[str] = set()
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            out |= _pages(value)
        else:
            out.add(value)
    return out


def _prune(entries, docs: Path):
    kept = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            key = next(iter(entry))
            kept.append({key: _prune(value, docs)})
        elif value.startswith("reference/") or (docs / value).is_file():
            kept.append(entry)  # reference/ pages are generated at build time
        else:
            log.info("nav: %s is not in docs/ (yet); left out", value)
    return kept


def on_config(config):
    docs = Path(config["docs_dir"])
    nav = config.get("nav")
    if not nav:
        return config
    nav = _prune(nav, docs)
    listed = _pages(nav)
    guides = next((e for e in nav if isinstance(e, dict) and "Guides" in e), None)
    if guides is None:
        guides = {"Guides": []}
        nav.append(guides)
    for path in sorted((docs / "guides").glob("*.md")):
        rel = path.relative_to(docs).as_posix()
        if rel not in listed:
            guides["Guides"].append({_title(path): rel})
    config["nav"] = nav
    return config
