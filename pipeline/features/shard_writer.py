"""Stage 1's writer: publishes one shard's arrays (``ShardOutput``) as ``<out_dir>/shard-<index>-of-<total>.h5`` plus its
rejects. Callable on its own; atomic (``cache.writer.write_shard``), so a killed job leaves no partial shard."""

from __future__ import annotations

from pathlib import Path

from pipeline.data.manifest import write_rejects
from pipeline.features.cache.format import CacheMeta, shard_name
from pipeline.features.cache.writer import write_shard
from pipeline.features.shard import ShardOutput


class ShardWriter:
    def __init__(self, out_dir: str | Path, meta: CacheMeta):
        self.out_dir = Path(out_dir)
        self.meta = meta

    def path(self, index: int) -> Path:
        return self.out_dir / shard_name(index, self.meta.total_shards)

    def __call__(self, out: ShardOutput) -> Path:
        path = self.path(out.index)
        write_rejects(out.rejects, path.with_name(path.name.replace(".h5", ".rejects.parquet")))
        return write_shard(
            path, self.meta, out.image, out.image_id, out.text, out.sample_id, out.text_image_id,
            image_norm=out.image_norm, text_norm=out.text_norm, image_views=out.image_views,
            view_params=out.view_params, lone_text=out.lone_text, lone_sample_id=out.lone_sample_id,
        )


__all__ = ["ShardWriter"]
