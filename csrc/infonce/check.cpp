#include "infonce/cpu.h"

namespace hotops {

void check(const InfoNceRows& a) {
  const auto floats = {DType::f32, DType::bf16, DType::f16};
  check_view(a.shared, "logits", 2, floats);
  check_rows_contiguous(a.shared, "logits");
  check_writable(a.shared, "logits");
  const int64_t P = a.shared.size(0), Na = a.shared.size(1);
  int64_t K = 0;
  if (a.own.present) {
    check_view(a.own, "own-negative logits", 2, floats);
    check_rows_contiguous(a.own, "own-negative logits");
    check_writable(a.own, "own-negative logits");
    HOTOPS_CHECK(a.own.size(0) == P, "own-negative logits have ", a.own.size(0), " rows, expected ", P);
    K = a.own.size(1);
  }
  if (a.weight.present) {
    check_view(a.weight, "neg_weight", 1, {DType::f32});
    check_contiguous(a.weight, "neg_weight");
    HOTOPS_CHECK(a.weight.size(0) == Na + K, "neg_weight has ", a.weight.size(0),
                 " entries, expected one per candidate column (", Na + K, ")");
  }
  if (a.row_scale.present) {
    check_view(a.row_scale, "row_scale", 1, {DType::f32});
    HOTOPS_CHECK(a.row_scale.size(0) == P, "row_scale must have ", P, " entries");
  }
  for (const View* v : {&a.loss, &a.lse, &a.tdot}) {
    check_view(*v, "row output", 1, {DType::f32});
    check_writable(*v, "row output");
    HOTOPS_CHECK(v->size(0) == P, "row outputs must have ", P, " entries");
  }
  HOTOPS_CHECK(a.pos_col >= 0 && a.pos_col + P <= Na, "positive columns [", a.pos_col, ", ", a.pos_col + P,
               ") fall outside the ", Na, " shared candidate columns");
}

}  // namespace hotops
