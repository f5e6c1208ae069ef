"""The stages of the chain, one module per family: shards, split, mix, fetch, read (tar_samples), shuffle,
decode, tiles, tokenize, pack, batch. Each keeps its own state code beside it."""
