// Subsampled attention (SSA): every query row of head h attends to the keys/values at rows
// idx[b, h_i, 0..S) of its KV head, with a flash-style online softmax. The gather happens inside
// the kernel, one key tile at a time: no Lq x S scores and no gathered copy of K or V exist.
//
// Visibility of key slot s to query row i (both for forward and backward):
//   kp = kpos ? kpos[b, h_i, s] : idx[b, h_i, s]      (the key's original position; < 0 = hidden)
//   qp = qpos ? qpos[b, h, i] : i                      (the query's original position)
//   visible  <=>  kp >= 0  and  (!causal or kp <= qp)
// A query that sees no key gets zeros and lse = -inf.
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

struct SsaArgs {
  View q;           // (B, H, Lq, D) f32 | bf16 | f16, last dim contiguous
  View k, v;        // (B, Hkv, Lk, D), H % Hkv == 0, same dtype as q
  View idx;         // (B, Hi, S) int64 rows of k/v, Hi == H or Hkv (any strides, e.g. expanded)
  View kpos;        // (B, Hi, S) int64 original key positions, or absent (= idx)
  View qpos;        // (B, H, Lq) int64 original query positions, or absent (= row index)
  View out;         // (B, H, Lq, D) forward output, same dtype as q (read by backward)
  View lse;         // (B, H, Lq) float32 log-sum-exp of the scaled scores (-inf: no key seen;
                    // +inf: the row's scores left float32's range and it was computed in double)
  View dout;        // backward only: (B, H, Lq, D) incoming gradient
  View dq, dk, dv;  // backward only: gradients, shapes and dtype of q, k, v
  float scale = 1.0f;
  bool causal = false;
  int threads = 1;
};

void check_forward(const SsaArgs& a);  // validates views, index ranges; throws hotops::Error
void check_backward(const SsaArgs& a);

HOTOPS_FOR_EACH_ISA(void ssa_forward(const SsaArgs& a); void ssa_backward(const SsaArgs& a);)

}  // namespace hotops
