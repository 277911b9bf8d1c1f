"""fedseal.client.data: Parquet shards, dataset attestation and the streaming loader."""

__all__: list[str] = []
