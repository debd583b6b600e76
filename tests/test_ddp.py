"""DistributedDataParallel over 2 gloo ranks gives the gradients of one process on the whole batch:
SparseLinear, CodebookLinear (fine-tuning codebooks and scales), SubsampledSelfAttention (one
generator per sample, seeded by the sample's global index) and InfoNCELoss(gather=True) with
hard negatives mined from a ShardedIndex (HardNegativeMiner) for each rank's own batch."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import _dist

E, L, B, WORLD, NEG = 16, 6, 4, 2, 3
CORPUS = 300


class Encoder(nn.Module):
    """tokens (b, L, E) -> SSA (train mode, sampled keys) -> mean over tokens -> sparse -> codebook."""

    def __init__(self):
        super().__init__()
        from hotops.nn import CodebookLinear, SparseLinear, SubsampledSelfAttention

        torch.manual_seed(0)
        self.attn = SubsampledSelfAttention(E, 2, keep=0.5)
        self.sparse = SparseLinear.from_dense(nn.Linear(E, E), sparsity=0.5, activation="relu", policy="sparse")
        self.book = CodebookLinear.from_linear(nn.Linear(E, E), bits_per_weight=1, in_group=4, num_codebooks=1)

    def forward(self, x, seeds):
        """x (b, L, E); sample i draws its key subsets from a generator seeded with seeds[i]."""
        rows = []
        for i in range(x.shape[0]):
            self.attn.generator = torch.Generator().manual_seed(1000 + int(seeds[i]))
            rows.append(self.attn(x[i:i + 1]))
        h = torch.cat(rows).mean(1)
        return self.book(self.sparse(h))


def _data():
    g = torch.Generator().manual_seed(1)
    q_tok, d_tok = torch.randn(B, L, E, generator=g), torch.randn(B, L, E, generator=g)
    corpus = torch.randn(CORPUS, E, generator=g)
    pos = torch.arange(B) * 7  # the documents' ids in the corpus (never mined as negatives)
    return q_tok, d_tok, corpus, pos


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world, model):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hotops.ann import PQIndex, ShardedIndex
    from hotops.ann.mining import HardNegativeMiner
    from hotops.nn import InfoNCELoss

    q_tok, d_tok, corpus, pos = _data()
    model.train()
    reference = Encoder()
    reference.load_state_dict(model.state_dict())
    reference.train()

    # the corpus index: trained once (same seed everywhere), one shard per rank
    single = PQIndex(E, 4, 8, keep_vectors=True, verbose=False)
    single.train(corpus.numpy())
    shard = PQIndex(E, 4, 8, keep_vectors=True, verbose=False)
    shard.set_codebooks(single.codebooks)
    mine_rows = np.arange(CORPUS) % world == rank
    shard.add(corpus.numpy()[mine_rows], np.flatnonzero(mine_rows))
    single.add(corpus.numpy(), np.arange(CORPUS))
    sharded = ShardedIndex(shard)

    # one process, the whole batch (negatives mined from the single index)
    seeds = torch.arange(2 * B)  # queries 0..B-1, documents B..2B-1
    out = reference(torch.cat([q_tok, d_tok]), seeds)
    q, d = out[:B], out[B:]
    with torch.no_grad():
        hard_all = HardNegativeMiner(single, n=NEG, depth=8).mine(q, pos, with_vectors=True).vectors
    loss = InfoNCELoss(gather=False)(q, d, hard_all)
    loss.backward()
    want = _grads(reference)

    # DDP: each rank its half, negatives mined from the shards, documents gathered by the loss
    ddp = DDP(model)
    per = B // world
    sl = slice(rank * per, (rank + 1) * per)
    out = ddp(torch.cat([q_tok[sl], d_tok[sl]]), torch.cat([seeds[:B][sl], seeds[B:][sl]]))
    q, d = out[:per], out[per:]
    with torch.no_grad():
        mined = HardNegativeMiner(sharded, n=NEG, depth=8).mine(q, pos[sl], with_vectors=True)
    torch.testing.assert_close(mined.vectors, hard_all[sl], rtol=0, atol=0)
    InfoNCELoss(gather=True)(q, d, mined.vectors).backward()
    got = _grads(model)
    assert set(got) == set(want) and {"sparse.values", "book.codebooks", "book.scales", "attn.q_proj.weight"} <= set(got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    dist.barrier()


def test_ddp_gradients_equal_one_process():
    _dist.run(_worker, WORLD, Encoder(), timeout=120)
