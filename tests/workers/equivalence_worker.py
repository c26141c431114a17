"""One rank of the equivalence check: CAP loss + student gradients and bank encoding on a shard.

Run by tests/test_distributed.py with RANK/WORLD_SIZE/MASTER_* set; writes rank 0's results to argv[1].
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.workers.common import (  # noqa: E402
    GLOBAL_BATCH,
    GLOBAL_EXTRA,
    make_banks,
    make_inputs,
    make_model,
    objective_for,
)


def main(out_path: str) -> None:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from cap_ds.cap import Shard, ShardSampler, encode_dataset
    from cap_ds.data.models import SentenceVectorHook

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = make_model()
    hook = SentenceVectorHook(model, "pooler")
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": len(GLOBAL_BATCH) // world, "zero_optimization": {"stage": 2},
                "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    shard = Shard(64, rank, world)
    banks = make_banks(shard)
    obj = objective_for(banks)
    idx = torch.tensor([i for i in GLOBAL_BATCH if i % world == rank])
    extra = torch.tensor([i for i in GLOBAL_EXTRA if i % world == rank])
    inputs, labels = make_inputs(idx)
    logits = engine(**inputs).logits
    anchors = F.normalize(hook.anchor, dim=-1)
    loss = F.cross_entropy(logits, labels)
    parts = {}
    for name, bank in banks.items():
        out = obj.module_loss(bank, anchors, idx, labels, extra_idx=extra)
        parts[name] = out["total"]
        loss = loss + out["total"]
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    # Loss as the world sees it: sum of per-rank pieces / world (each piece carries a world factor).
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    # Banks encoded in parallel on shards, then compared with a single-process encode of the same model.
    model.eval()
    sampler = ShardSampler(64, rank, world, shuffle=False, pad=False)
    loader = torch.utils.data.DataLoader(list(range(64)), batch_size=8, sampler=sampler,
                                         collate_fn=lambda ids: {"idx": torch.tensor(ids)})

    def enc(batch):
        inp, _ = make_inputs(batch["idx"])
        model(**inp)
        return {"vectors": F.normalize(hook.vector, dim=-1)}

    local = encode_dataset(enc, loader, 64, show_progress=False, shard=shard)["vectors"]
    full = torch.zeros(64, local.shape[1])
    for r in range(world):
        piece = local.clone() if r == rank else torch.zeros(len(range(r, 64, world)), local.shape[1])
        torch.distributed.broadcast(piece, src=r)
        full[r::world] = piece
    if rank == 0:
        torch.save({"loss": total.item() / world, "grads": grads, "bank": full,
                    "parts": {k: v.item() for k, v in parts.items()}}, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
