"""fedseal.crypto: pure cryptographic primitives over bytes and numpy arrays.

(Placeholder: the crypto core is being written; see issue 2.)
"""

__all__: list[str] = []
