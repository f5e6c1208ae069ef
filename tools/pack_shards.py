"""Pack image-text records into WebDataset shards: `vlmstream pack` from a checkout (vlmstream/dataset/build.py).

    python tools/pack_shards.py INPUT [INPUT ...] --output DIR [options]
    python tools/pack_shards.py merge DIR/index.j*.json --output DIR/index.json

`python tools/pack_shards.py --help` lists the options; docs/FORMAT.md describes what it writes.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

# The vlmstream of the checkout this file is in, as the other tools do: the tool and the library it packs with
# are one version, even where another vlmstream is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vlmstream.cli.pack import main as _main  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv, prog="pack_shards")


if __name__ == "__main__":
    sys.exit(main())
