"""fedseal.server: the coordinator (fl-server) and the offline auditor (fl-audit).

This package's ``__init__`` must stay light: ``fl-audit`` lives here and imports
neither flwr nor torch, so nothing here may import them at package import time.
"""

__all__: list[str] = []
