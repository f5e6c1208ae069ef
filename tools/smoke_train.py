"""Smoke-test training: a tiny nanoVLM-shaped model learns easy-VQA from vlmstream batches, end to end.

    python tools/smoke_train.py                        # pack easy-VQA, serve it with nginx, stream, train, evaluate
    python tools/smoke_train.py --device cuda          # bf16 autocast, pinned memory, non-blocking copies
    torchrun --nproc_per_node=2 tools/smoke_train.py   # DDP: gloo on CPU, nccl on GPU
    python tools/smoke_train.py --resume               # continue from WORKDIR/ckpt.pt, exactly
    python tools/smoke_train.py --data http://host/vqa # shards served elsewhere: {data}/train/index.json, ...
    python tools/smoke_train.py --set train.steps=100 --set model.dim=64   # change any value of the config

Read it top to bottom: the config, the model (patch vision encoder -> pixel-shuffle projector -> small causal
decoder, with nanoVLM's forward signature), the data (the vlmstream chain, its batches go to the model as they
are), the training loop (checkpoints hold the model, the optimizer and the loader's position; DDP), the
evaluation (greedy answers on the held-out test split against the majority-answer baseline) and the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

import vlmstream as vs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smoke_data  # noqa: E402  (tools/smoke_data.py: easy-VQA -> shards and a tokenizer)
from loopback_nginx import LoopbackNginx  # noqa: E402  (tools/loopback_nginx.py: nginx serving a folder)


# -------------------------------------------------------------------------------------------------- config
def load_config(path: str, overrides: list[str]) -> dict:
    """The YAML config, with ``section.key=value`` overrides (values parsed as YAML: 3e-3, true, null)."""
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        *sections, last = key.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        if last not in node:
            raise SystemExit(f"--set {item!r}: no {key!r} in {path}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string: numbers are numbers here
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        node[last] = parsed
    return cfg


# --------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    """A pre-norm transformer block: self-attention then an MLP, each added to the residual stream.
    The mask decides what attends to what: none in the vision encoder, causal (and no padding) in the decoder."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """A ViT in miniature with a convolutional stem ("early convolutions help transformers see better"): three
    stride-2 3x3 convolutions turn each 8x8 patch into a feature (64x64 pixels -> 8x8 features), then learned
    positions and a few bidirectional transformer blocks. Plain patchify (one 8x8 convolution) learns shapes
    far more slowly from scratch."""

    def __init__(self, image_size: int, patch: int, dim: int, layers: int, heads: int):
        super().__init__()
        stem, width = [], 3
        for k in range(int(math.log2(patch))):  # patch 8: 3 stride-2 convolutions
            out = dim if 2 ** (k + 1) == patch else dim // 2 ** (int(math.log2(patch)) - k - 1)
            stem += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU()]
            width = out
        self.stem = nn.Sequential(*stem[:-1])  # no activation after the last: it feeds the residual stream
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [tiles, 3, H, W] in [0, 1]
        x = self.stem(pixels * 2 - 1).flatten(2).transpose(1, 2) + self.pos  # [tiles, patches, dim]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class PixelShuffleProjector(nn.Module):
    """nanoVLM's modality projector: each s x s group of neighbouring patch features becomes one token
    (s*s times fewer, s*s times wider), then a linear map to the decoder's width. 8x8 patches, s=2: 16 tokens."""

    def __init__(self, vision_dim: int, dim: int, s: int):
        super().__init__()
        self.s = s
        self.proj = nn.Linear(vision_dim * s * s, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [tiles, side*side, vision_dim]
        n, p, d = x.shape
        side, s = math.isqrt(p), self.s
        x = x.view(n, side // s, s, side // s, s, d).permute(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(n, (side // s) ** 2, s * s * d))


def attention_rules(attention_mask: torch.Tensor, sequence_id: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, L, L] booleans, True where query t may attend to key u: u <= t, u is not padding, and (packed
    rows) u belongs to the same sample. Every token may attend to itself, so padding rows stay finite."""
    B, L = attention_mask.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, :]
    if sequence_id is not None:
        allowed = allowed & (sequence_id[:, :, None] == sequence_id[:, None, :])
    return (allowed | torch.eye(L, dtype=torch.bool, device=allowed.device))[:, None]


class TinyVLM(nn.Module):
    """Vision encoder -> pixel-shuffle projector -> causal decoder, in nanoVLM's shape and forward signature:
    the image tokens of `input_ids` (runs of `image_token_length`) are replaced by the projected image features,
    tile by tile, in the order of `images` (list per row of [tiles, 3, H, W], as vlmstream's batches hold them)."""

    def __init__(self, vocab_size: int, image_token_id: int, *, image_size: int, patch: int, vision_dim: int,
                 vision_layers: int, pixel_shuffle: int, dim: int, layers: int, heads: int, max_len: int):
        super().__init__()
        self.image_token_id = image_token_id
        self.image_token_length = (image_size // patch // pixel_shuffle) ** 2
        self.vision = VisionEncoder(image_size, patch, vision_dim, vision_layers, heads)
        self.projector = PixelShuffleProjector(vision_dim, dim, pixel_shuffle)
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied input and output embeddings
        # Weights ~ N(0, 1/fan_in): at this width GPT-2's fixed std 0.02 shrinks every layer's output ~6x, and
        # the attention path from the image tokens to the answers starts so weak that it takes ages to learn.
        for m in self.modules():
            if isinstance(m, nn.Linear) and m is not self.head:  # the head is the (tied) token embedding
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=m.embedding_dim ** -0.5)

    def forward(self, input_ids, images, attention_mask=None, targets=None, position_ids=None, sequence_id=None):
        """Logits [B, L, vocab], or with targets (labels already shifted, -100 ignored) the mean loss and the
        logits of the target positions only [N, vocab]: all the loss needs (most positions have no target)."""
        x = self.decode(input_ids, self.encode_images(images), attention_mask, position_ids, sequence_id)
        if targets is None:
            return self.head(x), None
        where = targets != -100
        logits = self.head(x[where])
        return logits, F.cross_entropy(logits.float(), targets[where])

    def encode_images(self, images) -> torch.Tensor:
        """list (per row) of lists of [tiles, 3, H, W] -> [all tiles, image_token_length, dim], in token order."""
        tiles = torch.cat([t for row in images for t in row])
        return self.projector(self.vision(tiles))

    def decode(self, input_ids, features, attention_mask=None, position_ids=None, sequence_id=None) -> torch.Tensor:
        """The decoder's last hidden states: token embeddings with the image features in place of the image
        tokens, plus positions, through the causal blocks."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:  # left padding: count positions from each row's first real token
            position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        x = self.embed(input_ids)
        is_image = (input_ids == self.image_token_id).unsqueeze(-1)
        x = x.masked_scatter(is_image, features.to(x.dtype)) + self.pos(position_ids)
        mask = attention_rules(attention_mask, sequence_id)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    @torch.no_grad()
    def generate(self, input_ids, images, attention_mask, max_new_tokens: int, end_id: int) -> torch.Tensor:
        """Greedy decoding: append the most likely token until every row has produced `end_id` (the images are
        encoded once; the decoder runs again over the whole sequence each step: short answers, no KV cache)."""
        features = self.encode_images(images)
        out = []
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.head(self.decode(input_ids, features, attention_mask)[:, -1])
            nxt = torch.where(done, end_id, logits.argmax(-1))
            out.append(nxt)
            done |= nxt == end_id
            input_ids = torch.cat([input_ids, nxt[:, None]], 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt[:, None])], 1)
            if done.all():
                break
        return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------------- data
def train_loader(base: str, tok: vs.ChatTokenizer, cfg: dict, pin_memory: bool) -> vs.Loader:
    """The whole chain, from the manifest over HTTP to nanoVLM batches. split_by_node(equalize="drop"): every
    rank gets disjoint shards and the same number of samples per epoch, however unevenly the shards divide."""
    t, m = cfg["train"], cfg["model"]
    stages = [
        vs.shards(f"{base}/train/index.json", shuffle=True, seed=cfg["seed"]),
        vs.split_by_node(equalize="drop"),
        vs.split_by_worker(),
        vs.fetch(prefetch=2),
        vs.tar_samples(),
        vs.shuffle(t["shuffle"], initial=min(100, t["shuffle"])),
        vs.decode(vs.ImageTiles(tile=m["image_size"], max_side=m["image_size"])),  # one tile per image
        vs.tokenize(tok, max_len=m["max_len"], overflow="truncate"),
    ]
    if t["pack"]:
        stages.append(vs.pack(t["pack"], buffer=64))
    stages.append(vs.batch(t["batch_size"]))
    return vs.Loader(vs.Pipeline(*stages, seed=cfg["seed"]), num_workers=t["num_workers"], pin_memory=pin_memory)


class question_prompts:
    """An evaluation stage (any callable from iterator to iterator is one): each test sample, an image with
    its questions as turns, becomes one prompt per question, as a first turn: the image and the question, then
    the assistant's turn opened. The answer travels with it, for scoring."""

    def __init__(self, tok: vs.ChatTokenizer):
        self.tok = tok
        self.opening = tok.tok.encode(tok.template.start.format(role="assistant"), add_special_tokens=False).ids

    def __call__(self, samples):
        for s in samples:
            conv = vs.conversation_from_sample(s)
            tiles = s[conv.images[0]]
            for q, a in zip(conv.messages[0::2], conv.messages[1::2]):
                question = q["content"].replace("<image>", "").strip()
                enc = self.tok.encode([{"role": "user", "content": "<image>\n" + question}], [tiles.grid])
                ids = torch.tensor(enc.input_ids + self.opening)
                yield {"input_ids": ids, "labels": torch.full_like(ids, -100), "images": [tiles.pixels],
                       "answer": a["content"], "__key__": s["__key__"], "__pad_id__": self.tok.pad_id}


def collate_prompts(rows: list[dict]) -> dict:
    return {**vs.vlm_collate(rows), "answers": [r["answer"] for r in rows]}


def eval_loader(base: str, tok: vs.ChatTokenizer, cfg: dict, pin_memory: bool) -> vs.Loader:
    m = cfg["model"]
    pipe = vs.Pipeline(
        vs.shards(f"{base}/test/index.json", shuffle=False),
        vs.split_by_node(samples=True), vs.split_by_worker(samples=True), vs.fetch(prefetch=2), vs.tar_samples(),
        vs.decode(vs.ImageTiles(tile=m["image_size"], max_side=m["image_size"])),
        question_prompts(tok),
        vs.batch(cfg["eval"]["batch_size"], collate=collate_prompts),
    )
    return vs.Loader(pipe, num_workers=1, pin_memory=pin_memory)


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and the images' nested lists) to the device; non-blocking from pinned memory on a GPU."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
        elif k == "images":
            v = [[t.to(device, non_blocking=True) for t in row] for row in v]
        out[k] = v
    return out


def endless(loader: vs.Loader):
    """Batches epoch after epoch (the loader advances its epoch after each full pass): training is counted in
    steps, so every DDP rank takes the same number of steps whatever its epochs hold."""
    empty = 0
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        empty = 0 if n else empty + 1
        if empty > 1:  # one empty pass is normal: resuming right at the end of an epoch
            raise RuntimeError("the training data yields no batch")


# ------------------------------------------------------------------------------------------------ training
def lr_at(step: int, t: dict) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < t["warmup"]:
        return t["lr"] * (step + 1) / t["warmup"]
    progress = (step - t["warmup"]) / max(1, t["steps"] - t["warmup"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def save_checkpoint(path: str, model: nn.Module, opt: torch.optim.Optimizer, loader: vs.Loader, step: int,
                    history: list[float], cfg: dict, world: int, master: bool) -> None:
    """Model, optimizer, step, loss history and every rank's loader position (JSON-serialisable), atomically."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, loader.state_dict())
    else:
        states = [loader.state_dict()]
    if master:
        ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "losses": history,
                "loader": states, "config": cfg, "torch_rng": torch.get_rng_state()}
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)


@torch.no_grad()
def evaluate(model: TinyVLM, base: str, tok: vs.ChatTokenizer, cfg: dict, device: torch.device, amp,
             majority: str, world: int) -> dict:
    """Greedy answers on this rank's share of the test split, then summed over ranks."""
    model.eval()
    kinds = {"yes/no": {"yes", "no"}, "shape": {"circle", "rectangle", "triangle"}}
    counts = torch.zeros(8, dtype=torch.float64)  # correct, total, baseline, then correct/total per kind
    for batch in eval_loader(base, tok, cfg, device.type == "cuda"):
        batch = to_device(batch, device)
        with amp:
            out = model.generate(batch["input_ids"], batch["images"], batch["attention_mask"],
                                 cfg["eval"]["max_new_tokens"], tok.end_id)
        for row, answer in zip(out.tolist(), batch["answers"]):
            text = tok.tok.decode(row[: row.index(tok.end_id)] if tok.end_id in row else row).strip()
            kind = next((i for i, (_, words) in enumerate(kinds.items()) if answer in words), 2)  # 2: color
            counts[0] += text == answer
            counts[1] += 1
            counts[2] += answer == majority
            counts[3 + kind] += text == answer
            counts[6] += kind == 0
            counts[7] += kind == 1
    if world > 1:
        counts = counts.to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(counts)
    model.train()
    c = counts.tolist()
    per_kind_total = [c[6], c[7], c[1] - c[6] - c[7]]
    return {"accuracy": c[0] / c[1], "questions": int(c[1]), "baseline": c[2] / c[1], "majority_answer": majority,
            "by_kind": {k: c[3 + i] / max(1, per_kind_total[i]) for i, k in enumerate(["yes/no", "shape", "color"])}}


def plot_losses(losses: list[float], path: str, title: str) -> None:
    """The loss curve as a PNG, drawn with Pillow on a log scale (the first steps fall from ~8 to ~0.3, the rest
    of the run from 0.3 to under 0.1): every step (light) and a 20-step moving average (dark)."""
    from PIL import Image, ImageDraw

    W, H, left, right, top, bottom = 900, 500, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    positive = [v for v in losses if v > 0] or [1.0]
    lo, hi = math.log10(min(positive)) - 0.05, math.log10(max(positive)) + 0.05
    n = max(2, len(losses))

    def xy(i: int, y: float) -> tuple[float, float]:
        frac = (math.log10(max(y, 10 ** lo)) - lo) / max(hi - lo, 1e-9)
        return left + (W - left - right) * i / (n - 1), top + (H - top - bottom) * (1 - min(frac, 1.0))

    for e in range(math.floor(lo), math.ceil(hi) + 1):  # grid lines at 1, 2 and 5 times the powers of ten
        for m in (1, 2, 5):
            y = m * 10.0 ** e
            if lo <= math.log10(y) <= hi:
                d.line([xy(0, y), xy(n - 1, y)], fill=(225, 225, 225))
                d.text((8, xy(0, y)[1] - 6), f"{y:g}", fill="black")
    for k in range(6):
        i = (n - 1) * k // 5
        d.text((xy(i, 1)[0] - 10, H - bottom + 8), str(i + 1), fill="black")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    if len(losses) > 1:
        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(150, 180, 230), width=1)
        avg = [sum(losses[max(0, i - 19): i + 1]) / len(losses[max(0, i - 19): i + 1]) for i in range(len(losses))]
        d.line([xy(i, v) for i, v in enumerate(avg)], fill=(20, 60, 160), width=2)
    d.text((left, 12), title, fill="black")
    d.text(((W - left) // 2, H - 22), "step", fill="black")
    d.text((8, 12), "loss (log)", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smoke.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override the config")
    ap.add_argument("--workdir", help="default: the config's workdir")
    ap.add_argument("--data", help="shards served elsewhere or a local folder holding train/, test/, "
                                   "tokenizer.json, info.json (default: prepare WORKDIR/data and serve it)")
    ap.add_argument("--no-serve", action="store_true", help="read the prepared shards as local files, no nginx")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--resume", action="store_true", help="continue from WORKDIR/ckpt.pt")
    ap.add_argument("--stop-at", type=int, help="checkpoint and stop after this step, as if interrupted")
    ap.add_argument("--no-eval", action="store_true", help="skip the test-split evaluation")
    ap.add_argument("--save-keys", action="store_true", help="write the sample keys each rank trained on, by epoch, "
                                                             "to WORKDIR/keys-rankR.json (to check that ranks are disjoint)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    workdir = args.workdir or cfg["workdir"]
    t_start = time.perf_counter()

    # Where this process runs: alone, or as one rank of torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK).
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # a resumed run repeats the uninterrupted one exactly (and no time lost filling new tensors)
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = print if master else (lambda *a, **k: None)
    os.makedirs(workdir, exist_ok=True)

    # The data: easy-VQA packed into shards and served over HTTP by nginx (rank 0 does it, the others wait).
    server, base = None, args.data
    if base is None:
        root = os.path.join(workdir, "data")
        if master:
            log(f"[1/4] preparing easy-VQA shards and the tokenizer under {root}")
            d = cfg["data"]
            smoke_data.prepare(root, maxcount=d["maxcount"], vocab_size=d["vocab_size"],
                               questions_per_record=d["questions_per_record"], train_images=d["train_images"],
                               test_images=d["test_images"], quiet=True)
            server = None if args.no_serve else LoopbackNginx(root)  # --no-serve: local files
            base = server.url if server else root
        if ddp:
            shared = [base]
            dist.broadcast_object_list(shared, src=0)
            base = shared[0]
    t_prepared = time.perf_counter()
    try:
        return train(args, cfg, workdir, base, rank, world, master, device, amp, log, t_start, t_prepared)
    finally:
        if ddp:
            dist.barrier()  # every rank is done with the server before it stops
        if server is not None:
            server.stop()
        if ddp:
            dist.destroy_process_group()


def train(args, cfg, workdir, base, rank, world, master, device, amp, log, t_start, t_prepared) -> dict:
    t = cfg["train"]
    with vs.open_url(f"{base}/info.json") as f:
        info = json.load(f)
    with vs.open_url(f"{base}/tokenizer.json") as f:
        from tokenizers import Tokenizer

        image_tokens = (cfg["model"]["image_size"] // cfg["model"]["patch"] // cfg["model"]["pixel_shuffle"]) ** 2
        tok = vs.ChatTokenizer(Tokenizer.from_str(f.read().decode()), image_token_length=image_tokens)
    log(f"[2/4] streaming {base}/train/index.json ({info['train']['images']} images, "
        f"{info['train']['questions']} questions) on {world} process(es), {t['num_workers']} loader workers each")

    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank
    raw = TinyVLM(len(tok), tok.image_token_id, **cfg["model"]).to(device)
    model = nn.parallel.DistributedDataParallel(raw) if world > 1 else raw
    decay = [p for p in raw.parameters() if p.dim() >= 2]
    no_decay = [p for p in raw.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0}],
                            lr=t["lr"], betas=(0.9, 0.95))
    loader = train_loader(base, tok, cfg, pin_memory=device.type == "cuda")
    ckpt_path = os.path.join(workdir, "ckpt.pt")
    start, history = 0, []
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location="cpu")
        raw.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])  # every rank's state: this rank picks its own
        torch.set_rng_state(ckpt["torch_rng"])
        start, history = ckpt["step"], list(ckpt["losses"])
        log(f"      resumed at step {start} from {ckpt_path}")
    params = sum(p.numel() for p in raw.parameters())
    log(f"[3/4] training {params / 1e6:.2f}M parameters for {t['steps']} steps of {t['batch_size']} rows on {device}")

    batches = endless(loader)
    stop = min(t["steps"], args.stop_at or t["steps"])
    wait = busy = 0.0  # seconds waiting for batches / whole steps, after the first step (the loader's start-up)
    first_wait, samples, tokens, keys = 0.0, 0, 0, []
    t_train, cpu_train = time.perf_counter(), time.process_time()
    for step in range(start, stop):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        batch = to_device(batch, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        with amp:
            _, loss = model(batch["input_ids"], batch["images"], attention_mask=batch["attention_mask"],
                            targets=batch["labels"], position_ids=batch.get("position_ids"),
                            sequence_id=batch.get("sequence_id"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        history.append(value.item())  # also waits for the GPU: the step's time is all in
        t2 = time.perf_counter()
        samples += sum(len(row) for row in batch["images"])
        if args.save_keys:
            keys += [[loader.epoch, k] for k in batch["__key__"]]
        tokens += int(batch["attention_mask"].sum())
        if step == start:
            first_wait = t1 - t0
        else:
            wait += t1 - t0
            busy += t2 - t0
        if master and ((step + 1) % t["log_every"] == 0 or step + 1 == stop):
            log(f"      step {step + 1:5d}  loss {history[-1]:.4f}  lr {lr_at(step, t):.2e}  "
                f"data-wait {wait / max(busy, 1e-9):.1%}  {time.perf_counter() - t_train:.0f}s")
        if (step + 1) % t["ckpt_every"] == 0 or step + 1 == stop:
            save_checkpoint(ckpt_path, raw, opt, loader, step + 1, history, cfg, world, master)
    batches.close()
    train_s, train_cpu_s = time.perf_counter() - t_train, time.process_time() - cpu_train
    # One write with its newline: ranks share the terminal, and print() writes the end apart when unbuffered.
    sys.stdout.write(f"rank {rank}: {stop - start} steps done, at step {stop}, epoch {loader.epoch}\n")
    sys.stdout.flush()
    if args.save_keys:
        with open(os.path.join(workdir, f"keys-rank{rank}.json"), "w") as f:
            json.dump(keys, f)
    counts = torch.tensor([samples, tokens], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    summary = {
        "steps": stop, "resumed_from": start if args.resume else None, "world_size": world, "device": str(device),
        "train_seconds": train_s, "train_cpu_seconds": train_cpu_s, "samples_per_s": counts[0].item() / train_s, "tokens_per_s": counts[1].item() / train_s,
        "data_wait_fraction": wait / busy if busy else 0.0, "first_batch_seconds": first_wait,
        "first_loss": history[0] if history else None, "final_loss": sum(history[-20:]) / len(history[-20:]) if history else None,
        "losses": history, "parameters": params, "data": base,
    }
    if master:
        plot_path = os.path.join(workdir, "loss.png")
        plot_losses(history, plot_path, f"smoke training on easy-VQA: {params / 1e6:.2f}M parameters, "
                                        f"{world} process(es), {device.type}")
        summary["plot"] = plot_path
        with open(os.path.join(workdir, "losses.json"), "w") as f:
            json.dump(history, f)

    if stop < t["steps"] or args.no_eval:
        log(f"stopped after step {stop}: checkpoint {ckpt_path}")
        return summary
    log(f"[4/4] evaluating on {base}/test/index.json: greedy answers to {info['test']['questions']} questions")
    t_eval = time.perf_counter()
    summary.update(evaluate(raw, base, tok, cfg, device, amp, info["majority_answer"], world))
    summary["eval_seconds"] = time.perf_counter() - t_eval
    summary["prepare_seconds"] = t_prepared - t_start
    summary["total_seconds"] = time.perf_counter() - t_start
    if master:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if k != "losses"}, f, indent=1)
        k = summary["by_kind"]
        log(f"""
summary: {summary['steps']} steps x {t['batch_size']} rows, {world} process(es) on {device.type}, {params / 1e6:.2f}M parameters
  throughput  {summary['samples_per_s']:.1f} samples/s (images, each with all its questions), {summary['tokens_per_s']:,.0f} tokens/s
  data-wait   {summary['data_wait_fraction']:.1%} of step time (first batch: {first_wait:.1f}s)
  loss        {summary['first_loss']:.3f} -> {summary['final_loss']:.4f} (mean of the last 20 steps)
  accuracy    {summary['accuracy']:.1%} on the test split ({summary['questions']} questions, greedy), majority-answer baseline ("{summary['majority_answer']}") {summary['baseline']:.1%}
              yes/no {k['yes/no']:.1%}, shape {k['shape']:.1%}, color {k['color']:.1%}
  time        {summary['total_seconds']:.0f}s in all: prepare and serve {summary['prepare_seconds']:.0f}s, train {train_s:.0f}s ({train_cpu_s:.0f} CPU-s in this process), evaluate {summary['eval_seconds']:.0f}s
  plot        {summary['plot']}""")
    return summary


if __name__ == "__main__":
    main()
