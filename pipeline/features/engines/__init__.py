"""Who runs stage 1's shards. ``local``: this process (``features.job.run_feature_job``); ``ray``: an actor pool on
a Ray cluster (``features.engines.ray``). Both use the job's shard plan, the mapper, the writer and the summary."""

ENGINES = ("local", "ray")
