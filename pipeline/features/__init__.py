"""Stage 1: run a teacher once over a manifest and write its embeddings to HDF5 cache shards (job, encode loop, cache/)."""
