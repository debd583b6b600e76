#include "attention/cpu.h"

namespace hotops {
namespace {

void check_qkv(const SsaArgs& a) {
  const auto floats = {DType::f32, DType::bf16, DType::f16};
  check_view(a.q, "q", 4, floats);
  check_view(a.k, "k", 4, floats);
  check_view(a.v, "v", 4, floats);
  for (const View* t : {&a.q, &a.k, &a.v}) check_rows_contiguous(*t, "q, k and v");
  HOTOPS_CHECK(a.k.dtype == a.q.dtype && a.v.dtype == a.q.dtype, "q, k and v must share one dtype, got ",
               dtype_name(a.q.dtype), ", ", dtype_name(a.k.dtype), ", ", dtype_name(a.v.dtype));
  const int64_t B = a.q.size(0), H = a.q.size(1), D = a.q.size(3);
  for (const View* t : {&a.k, &a.v})
    HOTOPS_CHECK(t->size(0) == B && t->size(3) == D, "k and v must be (B=", B, ", Hkv, Lk, D=", D, "), got (",
                 t->size(0), ", ", t->size(1), ", ", t->size(2), ", ", t->size(3), ")");
  HOTOPS_CHECK(a.k.size(1) == a.v.size(1) && a.k.size(2) == a.v.size(2), "k and v must have the same shape");
  const int64_t Hkv = a.k.size(1);
  HOTOPS_CHECK(Hkv > 0 && H % Hkv == 0, "the number of query heads (", H,
               ") must be a multiple of the number of key/value heads (", Hkv, ")");

  check_view(a.idx, "indices", 3, {DType::i64});
  HOTOPS_CHECK(a.idx.size(0) == B && (a.idx.size(1) == H || a.idx.size(1) == Hkv), "indices must be (B=", B,
               ", H=", H, " or Hkv=", Hkv, ", S), got (", a.idx.size(0), ", ", a.idx.size(1), ", ",
               a.idx.size(2), ")");
  const int64_t Lk = a.k.size(2);
  const int64_t* ip = a.idx.ptr<const int64_t>();
  for (int64_t b = 0; b < a.idx.size(0); ++b)
    for (int64_t h = 0; h < a.idx.size(1); ++h)
      for (int64_t s = 0; s < a.idx.size(2); ++s) {
        const int64_t r = ip[b * a.idx.stride(0) + h * a.idx.stride(1) + s * a.idx.stride(2)];
        HOTOPS_CHECK(r >= 0 && r < Lk, "indices[", b, ", ", h, ", ", s, "] = ", r, " is outside the ", Lk,
                     " key rows [0, ", Lk, ")");
      }
  if (a.kpos.present) {
    check_view(a.kpos, "key positions", 3, {DType::i64});
    for (int d = 0; d < 3; ++d)
      HOTOPS_CHECK(a.kpos.size(d) == a.idx.size(d), "key positions must have the shape of indices");
  }
  if (a.qpos.present) {
    check_view(a.qpos, "query positions", 3, {DType::i64});
    HOTOPS_CHECK(a.qpos.size(0) == B && a.qpos.size(1) == H && a.qpos.size(2) == a.q.size(2),
                 "query positions must be (B, H, Lq)");
  }
  HOTOPS_CHECK(a.threads >= 1, "threads must be at least 1");
}

void check_like(const View& t, const View& like, const char* what) {
  check_view(t, what, 4, {like.dtype});
  check_rows_contiguous(t, what);
  for (int d = 0; d < 4; ++d)
    HOTOPS_CHECK(t.size(d) == like.size(d), what, " must have the shape of the tensor it belongs to");
}

}  // namespace

void check_forward(const SsaArgs& a) {
  check_qkv(a);
  check_like(a.out, a.q, "out");
  check_view(a.lse, "lse", 3, {DType::f32});
  if (a.lse.numel() > 0) check_contiguous(a.lse, "lse");  // the kernel indexes it densely
  HOTOPS_CHECK(a.lse.size(0) == a.q.size(0) && a.lse.size(1) == a.q.size(1) && a.lse.size(2) == a.q.size(2),
               "lse must be (B, H, Lq)");
}

void check_backward(const SsaArgs& a) {
  check_forward(a);
  check_like(a.dout, a.q, "grad_out");
  check_like(a.dq, a.q, "dq");
  check_like(a.dk, a.k, "dk");
  check_like(a.dv, a.v, "dv");
}

}  // namespace hotops
