"""Memory banks: rows addressed by dataset index, snapshots appended, encode pass independent of order."""

import pytest
import torch

from cap_ds.cap import MemoryBank, encode_dataset


def test_lookup_by_index_and_columns():
    bank = MemoryBank("snc", 5, 3)
    col0 = torch.arange(15.0).view(5, 3)
    bank.add_column(col0)
    bank.add_column(col0 + 100)
    rows = bank.lookup(torch.tensor([4, 1]))
    assert rows.shape == (2, 2, 3)
    assert torch.equal(rows[0, 0], col0[4]) and torch.equal(rows[1, 1], col0[1] + 100)


def test_max_columns_drops_oldest_and_bad_shape_rejected():
    bank = MemoryBank("snc", 2, 2, max_columns=2)
    for v in range(3):
        bank.add_column(torch.full((2, 2), float(v)))
    assert bank.num_columns == 2 and bank.columns[0][0, 0].item() == 1.0
    with pytest.raises(ValueError, match="column must be"):
        bank.add_column(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        bank.add_column(torch.full((2, 2), float("nan")))


def test_bf16_bank_memory():
    bank = MemoryBank("fic", 10, 4, dtype=torch.bfloat16)
    bank.add_column(torch.randn(10, 4))
    assert bank.memory_bytes() == 10 * 4 * 2
    assert bank.lookup(torch.tensor([0])).dtype == torch.float32


def test_encode_dataset_places_rows_by_idx_not_order():
    # Batches arrive shuffled; the output must still be row i = example i.
    batches = [{"idx": torch.tensor([3, 0])}, {"idx": torch.tensor([2, 1])}]

    def enc(batch):
        return {"vectors": batch["idx"].float().unsqueeze(1).repeat(1, 2)}

    out = encode_dataset(enc, batches, 4, show_progress=False)
    assert out["vectors"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_encode_dataset_leaves_missing_rows_nan():
    out = encode_dataset(lambda b: {"v": torch.ones(1, 2)}, [{"idx": torch.tensor([1])}], 3, show_progress=False)
    assert torch.isnan(out["v"][0]).all() and not torch.isnan(out["v"][1]).any()
