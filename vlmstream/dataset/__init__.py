"""The writing side: the shard format (sample schema, manifest), input records, the tar writer and the packer
(behind `vlmstream pack` and tools/pack_shards.py)."""
