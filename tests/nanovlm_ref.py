"""nanoVLM's own data path on given records: run by tests/test_presets.py in a separate process, since it needs
transformers 4.x (under 5 its label mask breaks) and torchvision, which the project's environment does not hold.

    python tests/nanovlm_ref.py SPEC.json OUT.pt

SPEC names nanoVLM's source folder, the folders of its dependencies (``make test`` installs them under
.venv/nanovlm), the tokenizer folder, the processor's settings, the records (image files and texts) and how
vlmstream grouped them into packed rows and batches; OUT gets nanoVLM's samples, rows and batches. Nothing of
vlmstream is imported here.

torchvision: the registry's wheel is built for another torch and its package ``__init__`` loads C++ operators
that fail beside this one ("operator torchvision::nms does not exist"). nanoVLM uses only torchvision's
transforms, which are pure Python, so its package is registered here without running that ``__init__``
(an empty package whose submodules are found in the installed folder), after transformers has been imported
(transformers probes for torchvision at import and then does without it).
"""

from __future__ import annotations

import importlib.machinery
import io
import json
import sys
import types


def load_nanovlm(nanovlm: str, deps: str, torchvision: str) -> None:
    sys.path[:0] = [deps, nanovlm]
    import transformers  # noqa: F401  (before torchvision is findable: see the module's docstring)

    spec = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    spec.submodule_search_locations = [f"{torchvision}/torchvision"]
    pkg = types.ModuleType("torchvision")
    pkg.__spec__, pkg.__path__ = spec, spec.submodule_search_locations
    sys.modules["torchvision"] = pkg


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    load_nanovlm(spec["nanovlm"], spec["deps"], spec["torchvision"])
    import contextlib

    import torch
    from PIL import Image

    from data.advanced_datasets import ConstantLengthDataset
    from data.collators import VQACollator
    from data.datasets import VQADataset
    from data.processors import get_image_processor, get_tokenizer
    from models.config import VLMConfig

    cfg = VLMConfig()
    tok = get_tokenizer(spec["tokenizer"], cfg.vlm_extra_tokens, cfg.lm_chat_template)
    with contextlib.redirect_stdout(sys.stderr):  # DynamicResize prints its setting
        processor = get_image_processor(spec["max_side"], spec["tile"], True)
    records = spec["records"]
    ds = VQADataset(records, tok, processor, spec["image_token_length"])

    samples = {}
    for rec in records:
        images = []
        for path in rec["images"]:
            with open(path, "rb") as f:
                images.append(Image.open(io.BytesIO(f.read())))  # as HF datasets hands them over: mode as stored
        item = {"images": images, "texts": rec["texts"]}
        if not rec.get("system"):
            s = ds._process_data(item)  # nanoVLM's own entry point
        else:  # the same steps, with a system turn put first (its dataset format has none)
            processed, grids = ds._process_images(images) if images else ([], [])
            messages = ds._get_messages(item, grids)
            messages.insert(0, {"role": "system", "content": rec["system"]})
            ids, mask, attention = ds._prepare_inputs_and_loss_mask(messages)
            s = {"images": processed, "input_ids": ids, "attention_mask": attention,
                 "labels": ds._get_labels(ids, mask)}
        samples[rec["key"]] = s

    collate = VQACollator(tok, spec["seq_len"])
    batches = [collate([samples[k] for k in keys]) for keys in spec["batches"]]

    packer = ConstantLengthDataset(ds, seq_length=spec["seq_len"])
    rows = {}
    for keys in spec["rows"]:
        buffer = []
        for k in keys:  # what ConstantLengthDataset._producer does to each sample before packing it
            s = dict(samples[k])
            s["input_ids"] = torch.cat([s["input_ids"], torch.tensor([tok.pad_token_id])])
            s["attention_mask"] = torch.cat([s["attention_mask"], torch.tensor([0])])
            s["labels"] = torch.cat([s["labels"], torch.tensor([-100])])
            buffer.append(s)
        ids, labels, attention, images = packer._pack_one_group(range(len(keys)), buffer, spec["seq_len"])
        rows["+".join(keys)] = {"input_ids": ids, "labels": labels, "attention_mask": attention, "images": images}
    packed_batches = [collate([rows[r] for r in names]) for names in spec["packed_batches"]]
    torch.save({"samples": samples, "batches": batches, "packed_batches": packed_batches,
                "pad_token_id": tok.pad_token_id, "vocab": len(tok)}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
