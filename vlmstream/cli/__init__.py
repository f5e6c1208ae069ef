"""The `vlmstream` command: inspect, bench, pack."""
