"""nanoVLM's own data path as a contender of the VLM benchmark (tools/bench/vlm.py runs it in a process of its own).

    python tools/bench/nanovlm_run.py SPEC_JSON

SPEC names nanoVLM's source (../shared/nanovlm) and the folders of its environment (``make test`` installs them
under .venv/nanovlm: ``deps``, transformers 4.x with the hub client it pins; ``torchvision``, whose pure-Python
transforms nanoVLM's processor uses; ``datasets``, a Hugging Face datasets that works with that hub client), the
Parquet files, the tokenizer folder and the loader's settings. Nothing of vlmstream is imported here.

What runs is nanoVLM's train.py loader with its config's defaults (``VLMConfig``: tiles of 512, max side 2048,
``resize_to_max_side_len=True``, 64 image tokens a tile, sequences of 4096, 4 images a sample, 18 a sequence):
``load_dataset("parquet", streaming=True)`` -> ``VQADataset`` (its image processor and tokenizer set-up) ->
``ConstantLengthDataset`` -> ``DataLoader(batch_size, collate_fn=VQACollator, num_workers)``. Two settings differ
from train.py, said in the results: ``num_of_sequences`` (train.py: 4 x batch size, a buffer of 131,072 tokens of
decoded samples per worker, 6 GB of float tiles here, with the queue's groups on top: more than this machine holds
with two workers) and ``drop_last=False`` (every sample counted, as for the other contenders); ``pin_memory`` is off
(no GPU).

Prints one line, ``@@vlm-bench@@ {json}``: wall and CPU time from building the dataset to the last batch, the first
batch's time, and what the batches hold (samples: runs of attended tokens, each followed by nanoVLM's unattended
pad; tokens: the attention mask; image tokens; tiles).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import resource
import sys
import time
import types


def load_nanovlm(env: dict[str, str]) -> None:
    """nanoVLM's environment first on sys.path, and torchvision registered without its package __init__, whose
    C++ operators do not load beside this torch (tests/nanovlm_ref.py does the same)."""
    sys.path[:0] = [env["datasets"], env["deps"], env["nanovlm"]]
    import transformers  # noqa: F401  (before torchvision is findable: it probes for it and does without)

    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [f"{env['torchvision']}/torchvision"]
    pkg = types.ModuleType("torchvision")
    pkg.__spec__, pkg.__path__ = spec, spec.submodule_search_locations
    sys.modules["torchvision"] = pkg


def cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(spec: dict) -> None:
    load_nanovlm(spec["env"])
    import torch
    from datasets import load_dataset

    from data.advanced_datasets import ConstantLengthDataset
    from data.collators import VQACollator
    from data.datasets import VQADataset
    from data.processors import get_image_processor, get_tokenizer
    from models.config import TrainConfig, VLMConfig

    cfg, train = VLMConfig(), TrainConfig()
    assert (cfg.vit_img_size, cfg.max_img_size, cfg.mp_image_token_length) == (spec["tile"], spec["max_side"],
                                                                               spec["image_token_length"])
    tok = get_tokenizer(spec["tokenizer"], cfg.vlm_extra_tokens, cfg.lm_chat_template)
    with contextlib.redirect_stdout(sys.stderr):  # DynamicResize prints its setting
        processor = get_image_processor(cfg.max_img_size, cfg.vit_img_size, cfg.resize_to_max_side_len)
    image_id = tok.convert_tokens_to_ids(tok.image_token)

    def seed_worker(worker_id: int) -> None:  # train.py's
        import random

        import numpy

        seed = torch.initial_seed() % 2**32
        numpy.random.seed(seed)
        random.seed(seed)

    g = torch.Generator()
    g.manual_seed(0)
    c0, t0 = cpu_s(), time.perf_counter()
    ds = load_dataset("parquet", data_files=spec["files"], split="train", streaming=True)
    dataset = VQADataset(ds, tok, processor, cfg.mp_image_token_length, train.relevance_min_rating,
                         train.image_correspondence_min_rating, train.visual_dependency_min_rating,
                         train.formatting_min_rating)
    packed = ConstantLengthDataset(dataset, infinite=False, max_sample_length=train.max_sample_length,
                                   seq_length=cfg.lm_max_length, num_of_sequences=spec["num_of_sequences"],
                                   queue_size=spec["queue_size"], max_images_per_example=train.max_images_per_example,
                                   max_images_per_knapsack=train.max_images_per_knapsack)
    loader = torch.utils.data.DataLoader(packed, batch_size=spec["batch_size"],
                                         collate_fn=VQACollator(tok, cfg.lm_max_length),
                                         num_workers=spec["workers"], pin_memory=False, persistent_workers=False,
                                         drop_last=False, worker_init_fn=seed_worker, generator=g)
    counts = dict.fromkeys(("samples", "batches", "rows", "tokens", "image_tokens", "tiles"), 0)
    first, dtype = None, ""
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        mask = b["attention_mask"]
        ends = (mask[:, :-1] == 1) & (mask[:, 1:] == 0)  # each sample ends where its unattended pad begins
        counts["samples"] += int(ends.sum()) + int((mask[:, -1] == 1).sum())
        counts["batches"] += 1
        counts["rows"] += mask.shape[0]
        counts["tokens"] += int(mask.sum())
        counts["image_tokens"] += int((b["input_ids"] == image_id).sum())
        counts["tiles"] += sum(t.shape[0] for row in b["images"] for t in row)
        dtype = dtype or next((str(t.dtype) for row in b["images"] for t in row), "")
        del b
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    counts["fill"] = counts["tokens"] / (counts["rows"] * spec["seq_len"]) if counts["rows"] else 0.0
    counts["tile_dtype"] = dtype
    import datasets
    import transformers

    print("@@vlm-bench@@ " + json.dumps({"wall_s": wall, "cpu_s": cpu, "first_batch_s": first, "counts": counts,
                                          "versions": {"transformers": transformers.__version__,
                                                       "datasets": datasets.__version__}}), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
