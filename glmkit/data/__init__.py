"""The corpus: input sources, token stores, packed rows, the data fingerprint, and preparation."""
