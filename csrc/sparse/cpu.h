// Sparse weight x dense activation products for pruned linear and convolution layers.
//
// One engine serves both: a linear layer is a 1x1 convolution over a single "image" whose pixels
// are the batch (the caller passes x^T, so each input feature is a contiguous row of batch values).
// The weight is CSR over output channels, columns k = (c, dy, dx) of the (O, C/G * kh * kw)
// im2col view. Output pixels are processed in tiles: for each tile the kernel builds the im2col
// rows the weight actually uses (or reads the input in place for 1x1 / stride 1 / no padding),
// then every non-zero is one broadcast-FMA over a contiguous run of pixels.
#pragma once
#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

// The geometry of one call, python/hotops/sparse/spec.py's ConvGeometry field for field (the
// bindings read it by name). The caller derives the output size; check() refuses an output whose
// windows would reach past the padded input.
struct ConvGeom {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input: N images, C channels, H x W pixels
  int64_t O = 0, G = 1;                // output channels, groups
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t Ho = 0, Wo = 0;  // output size

  int64_t Cg() const { return C / G; }
  int64_t Og() const { return O / G; }
  int64_t K() const { return Cg() * kh * kw; }  // im2col rows per group
  int64_t P() const { return Ho * Wo; }         // output pixels per image
  bool direct() const {                         // the im2col matrix is the input itself
    return kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  }
};

// The activation fused into the forward's epilogue (after the bias). Python names it (None,
// "relu", "relu6"); act_from_name is the one mapping.
enum class Act : int { none = 0, relu = 1, relu6 = 2 };
Act act_from_name(const char* name);  // nullptr: none; throws on an unknown name

// CSR: rowptr (Q*R+1,) int64, colidx (nnz,) int32, values (nnz,) float32, its non-zeros ordered
// by (column panel q, row r, column): row r's non-zeros in panel q are [rowptr[q*R + r],
// rowptr[q*R + r + 1]). Q = 1 is plain CSR. The kernels take the panels from rowptr's length;
// which columns a panel holds is the packer's choice (python/hotops/sparse/format.py).
struct Csr {
  View rowptr, colidx, values;
};

// The output-channel-blocked form of a weight: blocks of b consecutive output rows of one group
// (a group's last block may have fewer rows), each stored over the union of its rows' columns,
// b values per stored column (row-minor, zero where a row lacks the column). Block j of group grp
// holds rows grp * Og + j * b ...; blocks are numbered grp * ceil(Og / b) + j. Column panels as in
// Csr: rowptr (Q * blocks + 1,) int64 over (panel, block), colidx (stored,) int32, values
// (stored * b,) float32.
struct Blocked {
  View rowptr, colidx, values;
};

// y[n, o, p] = act(bias[o] + sum_k w[o, k] * cols_n[g(o) * K + k, p])
struct SparseConvFwd {
  ConvGeom g;
  Csr w;          // R = O rows, columns in [0, K)
  int block = 0;  // b > 0: the forward runs on `blocked` (the same weight), w is not read
  Blocked blocked;
  View used_rowptr;  // (G*K+1,) int64: rowptr of w^T; im2col rows with no non-zero are skipped
  View x;            // (N, C, H*W) float32 (bfloat16 for direct layers), pixels contiguous
  View bias;         // (O,) float32 or absent
  View y;            // (N, O, Ho*Wo) float32, bfloat16 or float16, any strides
  Act act = Act::none;
  int threads = 1;
};

// gx = conv2d's input gradient: cols_n = w^T gy_n per group, then col2im (added into gx).
struct SparseConvBwdInput {
  ConvGeom g;
  Csr wt;     // w^T per group: R = G*K rows, columns in [0, Og); values: w's, in w's order
  View perm;  // (nnz,) int64: w^T's k-th value is wt.values[perm[k]]
  View gy;    // (N, O, Ho*Wo) float32, pixels contiguous
  View gx;    // (N, C, H*W) float32; zero-filled by the caller unless g.direct() (then overwritten)
  int threads = 1;
};

// gvalues[k] = sum_n sum_p gy[n, o(k), p] * cols_n[g * K + col(k), p], the dense-dense product
// sampled at w's non-zeros.
struct SparseConvBwdValues {
  ConvGeom g;
  Csr w;
  View used_rowptr;
  View x;        // (N, C, H*W) float32, pixels contiguous
  View gy;       // (N, O, Ho*Wo) float32, pixels contiguous
  View gvalues;  // (nnz,) float32, overwritten
  int threads = 1;
};

// dst = src (transpose false) or src^T, widened to float32: src (R, C) float32, bfloat16 or
// float16 with contiguous rows; dst float32 with contiguous rows, (R, C) or (C, R). Done
// here rather than by torch so no torch op runs right before a kernel: its OpenMP workers would spin on our
// cores.
struct SparseWiden {
  View src, dst;
  bool transpose = false;
  int threads = 1;
};

// Validation; throws hotops::Error.
void check(SparseConvFwd& a);
void check(SparseConvBwdInput& a);
void check(SparseConvBwdValues& a);
void check(SparseWiden& a);

HOTOPS_FOR_EACH_ISA(void sparse_conv_fwd(const SparseConvFwd& a);
                    void sparse_conv_fwd_blocked(const SparseConvFwd& a);  // blocked.cpp; a.block > 0
                    void sparse_conv_bwd_input(const SparseConvBwdInput& a);
                    void sparse_conv_bwd_values(const SparseConvBwdValues& a);
                    void sparse_widen(const SparseWiden& a);)

}  // namespace hotops
