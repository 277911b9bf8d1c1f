"""fedseal.client: the partner site (fl-client): data, attestation, local training.

This package's ``__init__`` stays light: importing it must not import torch or flwr.
"""

__all__: list[str] = []
