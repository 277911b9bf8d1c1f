"""fedseal.protocol: sans-IO secure-aggregation state machines and message schemas.

(Placeholder: see issue 4.)
"""

__all__: list[str] = []
