"""MkDocs hooks (mkdocs.yml ``hooks:``).

- The README is the site's front page (docs/index.md links to it). The README is written
  for the repository, so its links point into ``docs/`` (``docs/cli.md``) and at
  ``CHANGELOG.md``; on the site those pages sit beside the front page. Rewriting the
  links here keeps one README for both, with no copy of it.
- The CLI reference (mkdocs-click 0.9) takes each command's help text as Markdown and
  drops click's ``\\b`` markers, so the paragraphs ``--help`` prints unwrapped (the
  examples) run together into one line. Each such paragraph becomes a code block here,
  before mkdocs-click drops the marker, so the page shows the examples as ``--help``
  does (tests/test_docs.py checks that it does).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from mkdocs_click import _docs as click_docs

_DOCS_LINK = re.compile(r"\]\(docs/")
_CHANGELOG = re.compile(r"\]\(CHANGELOG\.md")
_NO_REWRAP = "\b"  # click's marker: the paragraph that follows keeps its lines
_make_description = click_docs._make_description


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001
    if page.file.src_uri != "index.md":
        return markdown
    markdown = _DOCS_LINK.sub("](", markdown)
    return _CHANGELOG.sub("](changelog.md", markdown)


def _unwrapped_as_code(lines: list[str]) -> Iterator[str]:
    """Each paragraph after a ``\\b`` line as a fenced code block."""
    block: list[str] | None = None
    for line in [*lines, ""]:
        if block is not None:
            if line.strip():
                block.append(line)
                continue
            if block:
                yield from ("```text", *block, "```")
            block = None
            yield ""
        elif line.strip() == _NO_REWRAP:
            block = []
        else:
            yield line


def _description(ctx, remove_ascii_art: bool = False) -> Iterator[str]:
    lines = list(_make_description(ctx, remove_ascii_art=remove_ascii_art))
    yield from _unwrapped_as_code(lines)


def on_config(config):
    click_docs._make_description = _description
    return config
