"""Datasets as manifests: the canonical parquet table, readers of source formats, built-in datasets, image decoding and loading."""
