"""The package's public face: DESIGN.md's verbs, imported lazily."""

import subprocess
import sys

VERBS = ["Pipeline", "shards", "split_by_node", "split_by_worker", "fetch", "tar_samples", "shuffle", "decode",
         "tokenize", "pack", "batch", "Loader", "ChatTokenizer", "ImageTiles"]


def test_verbs_stay_verbs_after_their_modules_are_imported():
    code = ("import vlmstream as vs, vlmstream.stages.pack, vlmstream.stages.tokenize, vlmstream.stages.batch, "
            "vlmstream.stages.decode, vlmstream.stages.shuffle, vlmstream.stages.fetch\n"
            f"bad = [n for n in {VERBS!r} if not callable(getattr(vs, n)) or isinstance(getattr(vs, n), type(vs))]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_format_and_pack_tool_modules_do_not_load_torch():
    code = ("import sys, vlmstream.dataset.format, vlmstream.dataset.records, vlmstream.dataset.writer, "
            "vlmstream.dataset.build; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
