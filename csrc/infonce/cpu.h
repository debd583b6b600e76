// InfoNCE row pass: given a panel of raw logits (dot products) for P query rows, compute each
// row's log-sum-exp and loss and, when asked, overwrite the logits with d loss / d logits, so the
// caller's next two GEMMs (dq = G C, dC += G^T q) finish forward and backward in one sweep.
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

struct InfoNceRows {
  View shared;           // (P, Na) q·candidate for candidates every row sees; overwritten with G if want_grad
  View own;              // (P, K) q·own-hard-negative, or absent; overwritten with G if want_grad
  View weight;           // (Na + K,) float32 softmax-denominator weights on candidates, or absent
  View row_scale;        // (P,) float32 per-row gradient scale (backward of reduction="none"), or absent
  View loss, lse, tdot;  // (P,) float32 out: loss, log-sum-exp, sum_j G_ij * logit_ij (for d/dT)
  int64_t pos_col = 0;   // row r's positive is shared[r, pos_col + r]
  float inv_t = 1.0f;
  float smoothing = 0.0f;
  float grad_scale = 1.0f;  // multiplies G (1/B for mean reduction)
  bool want_grad = false;
  int threads = 1;
};

// Validates what memory safety needs (views, shapes, dtypes, the positive columns); the values of
// temperature and label_smoothing are checked once, by hotops.info_nce. Throws hotops::Error.
void check(const InfoNceRows& a);

HOTOPS_FOR_EACH_ISA(void infonce_rows(const InfoNceRows& a);)

}  // namespace hotops
