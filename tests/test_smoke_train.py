"""tools/smoke_train.py: a short run end to end (nginx, checkpoint, plot, summary), exact resumption, and DDP
with two processes on CPU over an uneven shard count (both finish, the same number of steps, disjoint data).

Tiny model, a few steps, an easy-VQA subset: the whole file takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import smoke_data  # noqa: E402

TINY = {
    "model.dim": 32, "model.vision_dim": 32, "model.layers": 1, "model.vision_layers": 1, "model.heads": 2,
    "train.batch_size": 4, "train.shuffle": 16, "train.log_every": 1, "train.warmup": 2, "train.num_workers": 2,
    "eval.batch_size": 64,
}
DATA = {"train_images": 24, "test_images": 6, "maxcount": 15}  # 24 images in records of <= 4 questions: 5 shards


def sets(**extra) -> list[str]:
    out = []
    for k, v in {**TINY, **{k.replace("__", "."): v for k, v in extra.items()}}.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def run_tool(args: list[str], *, torchrun: int = 0, timeout: float = 240) -> subprocess.CompletedProcess:
    """The tool as a user runs it; on timeout the whole process group goes (torchrun's ranks too)."""
    tool = [os.path.join(ROOT, "tools", "smoke_train.py"), "--config", os.path.join(ROOT, "configs", "smoke.yaml")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launcher, *tool, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s (a rank waiting for the other?):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose data/ is prepared once (the tool then reuses it: same settings)."""
    w = str(tmp_path_factory.mktemp("smoke"))
    info = smoke_data.prepare(os.path.join(w, "data"), vocab_size=300, quiet=True, **DATA)
    assert info["train"]["images"] == 24 and info["test"]["images"] == 6
    with open(os.path.join(w, "data", "train", "index.json")) as f:
        assert json.load(f)["num_shards"] == 5  # uneven over 2 ranks
    return w


def data_sets() -> list[str]:
    return sets(**{f"data__{k}": v for k, v in DATA.items()}, data__vocab_size=300)


def test_short_run_serves_streams_trains_checkpoints_and_reports(workdir):
    out = run_tool(["--workdir", workdir, *data_sets(), *sets(train__steps=5, train__ckpt_every=100)]).stdout
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["data"].startswith("http://127.0.0.1:")  # served by nginx, streamed over HTTP
    assert summary["steps"] == 5 and summary["questions"] > 0
    assert 0 <= summary["accuracy"] <= 1 and 0 < summary["baseline"] < 1 and summary["majority_answer"] == "yes"
    assert 0 <= summary["data_wait_fraction"] < 1 and summary["samples_per_s"] > 0
    with open(os.path.join(workdir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(workdir, "ckpt.pt"), map_location="cpu")
    assert ckpt["step"] == 5 and len(ckpt["losses"]) == 5 and all(torch.isfinite(torch.tensor(ckpt["losses"])))
    assert json.loads(json.dumps(ckpt["loader"])) == ckpt["loader"]  # the loader's position: plain JSON
    assert {"model", "optimizer"} <= set(ckpt)
    for line in ("accuracy", "majority-answer baseline", "data-wait", "samples/s", "plot"):
        assert line in out


def test_resumed_run_continues_the_uninterrupted_loss_curve_exactly(workdir, tmp_path):
    data = os.path.join(workdir, "data")
    common = ["--data", data, "--no-eval", *sets(train__steps=8, train__ckpt_every=100)]
    run_tool(["--workdir", str(tmp_path / "straight"), *common])
    run_tool(["--workdir", str(tmp_path / "resumed"), *common, "--stop-at", "3"])
    with open(tmp_path / "resumed" / "losses.json") as f:
        assert len(json.load(f)) == 3
    out = run_tool(["--workdir", str(tmp_path / "resumed"), *common, "--resume"]).stdout
    assert "resumed at step 3" in out
    with open(tmp_path / "straight" / "losses.json") as f:
        straight = json.load(f)
    with open(tmp_path / "resumed" / "losses.json") as f:
        resumed = json.load(f)
    assert len(straight) == 8 and resumed == straight  # bit for bit: same batches, same steps


def test_ddp_two_processes_uneven_shards_same_steps_disjoint_data(workdir, tmp_path):
    data = os.path.join(workdir, "data")
    # 5 shards over 2 ranks x 2 workers; 12 steps run past the end of the first epoch on both ranks.
    out = run_tool(["--data", data, "--workdir", str(tmp_path), "--save-keys",
                    *sets(train__steps=12, train__ckpt_every=6)], torchrun=2, timeout=300).stdout
    done = re.findall(r"rank (\d): (\d+) steps done, at step (\d+)", out)
    assert sorted(done) == [("0", "12", "12"), ("1", "12", "12")], out[-3000:]
    keys = []
    for r in range(2):
        with open(tmp_path / f"keys-rank{r}.json") as f:
            keys.append(json.load(f))
    first = [{k for e, k in ks if e == 0} for ks in keys]
    assert first[0] and first[1] and first[0].isdisjoint(first[1])  # disjoint shards in an epoch
    assert len(first[0]) == len(first[1])  # equalize="drop": the same number of samples per epoch
    assert any(e == 1 for e, _ in keys[0]) and any(e == 1 for e, _ in keys[1])
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu")
    assert ckpt["step"] == 12 and [s["rank"] for s in ckpt["loader"]] == [0, 1]  # every rank's position
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["world_size"] == 2 and summary["questions"] > 0  # the test split shared between ranks
