"""I/O back ends: the tar parser, HTTP(S) with retries and Range resume, read-ahead, the shard cache, the Hub, URL
opening. Imports nothing of the runner, the stages, the dataset writer or the cli."""
