"""The core: the stage protocol, the pipeline runner, checkpoints, the Loader, shared memory, telemetry.

Imports only io below it (never stages, dataset or cli)."""
