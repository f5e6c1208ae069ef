"""The `vlmstream` command: ``vlmstream pack``, ``vlmstream inspect SHARDS`` and ``vlmstream bench SHARDS``.

    vlmstream pack llava.json --image-root images/ --output shards/ --maxcount 10000
    vlmstream inspect shards/index.json --sheet sheet.png --tile 512 --max-side 1024 --tokenizer tokenizer.json
    vlmstream inspect "https://host/ds/shard-{000000..000127}.tar" --json
    vlmstream bench shards/index.json --job 224 --workers 4 --out bench-out/
    vlmstream bench --suite --write-docs docs/BENCHMARKS.md      # the project's benchmarks, as in the docs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence


def _spec(values: Sequence[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)


def load_tokenizer(name: str | None, template: str = "chatml", image_token_length: int = 64) -> Any:
    """A ChatTokenizer from a tokenizer.json path, or from a Hub model id; None without a name."""
    from ..stages.tokenize import ChatTokenizer

    return ChatTokenizer.load(name, template=template, image_token_length=image_token_length) if name else None


# ---------------------------------------------------------------------------------------------------- inspect


def _font_file(path: str) -> str:
    if not os.path.isfile(path):  # refused before the shards are read, not after
        raise argparse.ArgumentTypeError(f"no font file {path!r}")
    return path


def add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="the dataset's shape, shards checked against the manifest, a contact sheet",
                       description="Read every shard once (local, http(s)://, hf://): counts, member extensions, "
                       "image sizes and modes, tile grids, turns and images per sample, text lengths, token counts "
                       "(with --tokenizer); each shard's sha256, samples and bytes checked against the manifest; "
                       "and, with --sheet, a contact sheet PNG of sampled images with their tile grids beside "
                       "their conversations. Exit status 1 when a check fails.")
    p.add_argument("shards", nargs="+", help="a manifest (index.json), brace pattern, glob, URL or hf:// spec")
    p.add_argument("--tokenizer", help="tokenizer.json path or Hub model id: adds token counts per sample")
    p.add_argument("--template", default="chatml", help="chat template of --tokenizer (chatml, llama3)")
    p.add_argument("--image-token-length", type=int, default=64, help="image tokens per tile (nanoVLM: 64)")
    p.add_argument("--tile", type=int, default=512, help="vs.ImageTiles tile size, for grids and image tokens")
    p.add_argument("--max-side", type=int, default=2048, help="vs.ImageTiles max_side")
    p.add_argument("--sheet", metavar="PNG", help="write a contact sheet of --samples samples here")
    p.add_argument("-n", "--samples", type=int, default=12, help="samples on the contact sheet")
    p.add_argument("--columns", type=int, default=2, help="samples per row of the contact sheet")
    p.add_argument("--cell", type=int, default=256, help="pixels of the square each sample's images are drawn in")
    p.add_argument("--font", action="append", metavar="FILE", type=_font_file,
                   help="a font file for the sheet's characters Pillow's default font lacks (CJK, emoji, ...); "
                   "repeat for several, tried in order (default: Noto Sans CJK and Noto Color Emoji where installed)")
    p.add_argument("--first", action="store_true", help="the sheet shows the first samples (default: a random pick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sheet's random pick")
    p.add_argument("--max-shards", type=int, help="read only the first N shards of the list")
    p.add_argument("--no-verify", action="store_true", help="do not compute sha256 (counts are still checked)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .inspect import SheetLayout, inspect_shards, write_contact_sheet

    tok = load_tokenizer(args.tokenizer, args.template, args.image_token_length)
    spec = _spec(args.shards)
    res = inspect_shards(spec, tokenizer=tok, tile=args.tile, max_side=args.max_side,
                         pick=args.samples if args.sheet else 0, first=args.first, seed=args.seed,
                         max_shards=args.max_shards, verify=not args.no_verify, progress=args.progress)
    out = res.as_dict()
    if args.sheet:
        if res.picked:
            title = f"{res.spec if isinstance(res.spec, str) else res.spec[0] + ' ...'}: {res.shape.samples:,} samples"
            size = write_contact_sheet(args.sheet, res.picked, tile=args.tile, max_side=args.max_side, title=title,
                                       layout=SheetLayout(columns=args.columns, cell=args.cell), fonts=args.font)
            out["contact_sheet"] = {"path": args.sheet, "size": list(size), "samples": len(res.picked)}
        else:
            out["contact_sheet"] = None
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(res.text())
        if out.get("contact_sheet"):
            cs = out["contact_sheet"]
            print(f"contact sheet: {cs['path']} ({cs['size'][0]}x{cs['size'][1]}, {cs['samples']} samples)")
    return 0 if res.ok else 1


# ------------------------------------------------------------------------------------------------------ bench


def add_bench(sub: Any) -> None:
    from .bench import add_arguments

    p = sub.add_parser("bench", help="benchmark your shards (or, with --suite, the project's benchmark corpus)",
                       description="On your shards: tar reading alone, the job's stages in one process (per-stage "
                       "samples/s and MB/s from the pipeline's telemetry), the job end to end through vs.Loader "
                       "(time to first batch, requests, peak RSS), the bare decode limit and the telemetry "
                       "overhead; a markdown table, a JSON file and a PNG chart. With --suite: the benchmarks of "
                       "docs/BENCHMARKS.md on the project's corpus, against webdataset and Hugging Face datasets "
                       "(needs a checkout of the repository: tools/).")
    add_arguments(p)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .bench import main_from_args

    return main_from_args(args)


def add_pack(sub: Any) -> None:
    # `vlmstream pack ...` is handed whole to cli/pack.py's own parser (it has a `merge` form of its own);
    # this entry only lists it in `vlmstream --help`.
    sub.add_parser("pack", help="pack image-text records into WebDataset shards with a manifest", add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pack"]:
        from .pack import main as pack_main

        return pack_main(argv[1:])
    ap = argparse.ArgumentParser(prog="vlmstream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{pack,inspect,bench}")
    add_pack(sub)
    add_inspect(sub)
    add_bench(sub)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
