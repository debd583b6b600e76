"""The GPU path of the product-quantized indexes: the arrays copied to the queries' device once
per change, query tables in torch, the Triton ADC scan, the exact re-rank in plain torch."""

from __future__ import annotations

import numpy as np
import torch

from hotops.ann import _arrays


class OnDevice:
    """Mixed into the product-quantized indexes; subclasses give _device_scan (and _device_extra)."""

    def _on_device(self, device) -> dict:
        """The index's arrays as tensors on `device`, copied again only after the index changed."""
        arrays = (self.codes, self.ids, self.codebooks, self.vectors, getattr(self, "coarse", None))
        key = (str(device),) + tuple(map(id, arrays))
        cached_key, state = self._device_cached
        if cached_key != key:  # every change replaces an array (the cache keeps them alive)
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
            state = dict(
                codes=t(self.codes),
                ids=t(self.ids),
                codebooks=t(self.codebooks),
                cnorm=t((self.codebooks.astype(np.float64) ** 2).sum(-1).astype(np.float32)),
            )
            if self.keep_vectors:
                state["vectors"] = t(self.vectors)
            state.update(self._device_extra(t))
            state["_arrays"] = arrays  # ids stay unique while the arrays live
            self._device_cached = (key, state)  # one store: concurrent searches see key and state together
        return state

    def _device_extra(self, to_device) -> dict:
        return {}

    def _device_tables(self, state: dict, q: torch.Tensor, with_norm: bool) -> torch.Tensor:
        """(nq, m, ksub) query tables on the device: ||b||^2 - 2<q_s, b> (+ ||q_s||^2 if
        with_norm) for l2, -<q_s, b> for ip."""
        dots = torch.einsum("nsd,sjd->nsj", q.view(q.shape[0], self.m, self.dsub), state["codebooks"])
        if self.metric == "ip":
            return (-dots).contiguous()
        t = state["cnorm"][None] - 2 * dots
        if with_norm:
            t += q.view(q.shape[0], self.m, self.dsub).square().sum(-1, keepdim=True)
        return t.contiguous()

    def _search_triton(self, q, k, refine, allow, **kw):
        from hotops.ann import triton as ann_triton

        q = _arrays.as_device_vectors(q, "queries", self.dim)
        state = self._on_device(q.device)
        kk = k * refine if refine else k
        allow = self._scan_allow(allow)
        allow = torch.from_numpy(allow).to(q.device) if allow is not None else None
        scan = self._device_scan(state, q, **kw)
        score, rows = ann_triton.adc_topk(scan.pop("qtables"), state["codes"], k=kk, allow=allow, **scan)
        if refine:
            score, rows = self._device_rerank(state, q, rows, k)
        dist = -score if self.metric == "ip" else score
        return dist, torch.where(rows >= 0, state["ids"][rows.clamp(min=0)], -1)

    def _device_rerank(self, state, q, rows, k):
        """Exact scores of the candidate rows from the kept vectors, best k (plain torch)."""
        cand = state["vectors"][rows.clamp(min=0)]  # (nq, kk, dim)
        if self.metric == "l2":
            exact = (cand - q[:, None]).square().sum(-1)
        else:
            exact = -torch.einsum("nkd,nd->nk", cand, q)
        exact = exact.masked_fill(rows < 0, float("inf"))
        score, at = torch.topk(exact, min(k, exact.shape[1]), dim=1, largest=False, sorted=True)
        rows = torch.gather(rows, 1, at).masked_fill(torch.isinf(score), -1)
        if score.shape[1] < k:  # fewer candidates than k
            pad = k - score.shape[1]
            score = torch.nn.functional.pad(score, (0, pad), value=float("inf"))
            rows = torch.nn.functional.pad(rows, (0, pad), value=-1)
        return score, rows
