"""MkDocs hook: the README is the site's front page (docs/index.md links to it).

The README is written for the repository, so its links point into ``docs/``
(``docs/cli.md``) and at ``CHANGELOG.md``; on the site those pages sit beside the
front page. Rewriting the links here keeps one README for both, with no copy of it.
"""

from __future__ import annotations

import re

_DOCS_LINK = re.compile(r"\]\(docs/")
_CHANGELOG = re.compile(r"\]\(CHANGELOG\.md")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001
    if page.file.src_uri != "index.md":
        return markdown
    markdown = _DOCS_LINK.sub("](", markdown)
    return _CHANGELOG.sub("](changelog.md", markdown)
