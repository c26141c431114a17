"""2 real ranks (gloo, CPU): the distributed CAP path reduces exactly to the single-process one."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, free_port
from tests.workers.common import (
    GLOBAL_BATCH,
    GLOBAL_EXTRA,
    make_banks,
    make_inputs,
    make_model,
    objective_for,
)

pytestmark = pytest.mark.distributed


def launch(script: str, args: list[str], world: int = 2, timeout: int = 300, extra_env: dict | None = None):
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


def single_process_reference():
    from cap_ds.cap import Shard
    from cap_ds.data.models import SentenceVectorHook

    model = make_model()
    hook = SentenceVectorHook(model, "pooler")
    banks = make_banks(Shard(64))
    obj = objective_for(banks)
    idx = torch.tensor(GLOBAL_BATCH)
    inputs, labels = make_inputs(idx)
    logits = model(**inputs).logits
    anchors = F.normalize(hook.anchor, dim=-1)
    loss = F.cross_entropy(logits, labels)
    for bank in banks.values():
        loss = loss + obj.module_loss(bank, anchors, idx, labels, extra_idx=torch.tensor(GLOBAL_EXTRA))["total"]
    loss.backward()
    model.eval()
    inputs_all, _ = make_inputs(torch.arange(64))
    model(**inputs_all)
    bank = F.normalize(hook.vector, dim=-1).detach()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, bank


def test_two_ranks_equal_one_rank_double_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    launch("tests/workers/equivalence_worker.py", [str(out)])
    got = torch.load(out, weights_only=True)
    loss, grads, bank = single_process_reference()
    assert got["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-6)
    checked = 0
    for name, g in grads.items():
        if g is None:
            continue
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    assert checked > 10
    # Banks encoded on 2 shards equal the single-process encode.
    torch.testing.assert_close(got["bank"], bank, rtol=1e-5, atol=1e-6)
