"""The one place the Hub is spoken to for reading: listings, cache paths, downloads, safetensors headers,
range reads with one retry policy, streamed shards, and one mapping of HTTP failures to one-line errors.

Pre-flight, resolution and ``--stream`` (``sources``) all go through here, so a fault handled once is
handled everywhere: ``errors`` (failure -> message), ``ranges`` (HTTP range reads, retries, signed
storage URLs), ``listing`` (a revision's files, the HF cache, downloads), ``headers`` (a shard's
header, local or remote), and the streamed shards (``stream``, ``stream_files``, ``spill``,
``stream_state``).
"""
