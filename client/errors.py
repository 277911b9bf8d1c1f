"""The site's one error root: every error ``fedseal.client`` raises on purpose derives from
:class:`SiteError`, so ``fl-client`` (and an embedding program) can tell "the site refused or
failed, with a reason for the operator" from a bug with one ``except``.

Each subclass keeps the standard base it had before (``RuntimeError`` where callers relied on
it), so catching it the old way still works.
"""

from __future__ import annotations

__all__ = ["SiteError"]


class SiteError(Exception):
    """A site-side failure or refusal with a message meant for the operator (one line)."""
