"""HDF5 teacher-feature cache: shard files written atomically, read back as memory maps."""

from pipeline.features.cache.format import CacheMeta, shard_name
from pipeline.features.cache.reader import FeatureCache, ShardedRows, open_cached_split
from pipeline.features.cache.writer import write_shard

__all__ = ["CacheMeta", "FeatureCache", "ShardedRows", "open_cached_split", "shard_name", "write_shard"]
