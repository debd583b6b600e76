// Product-quantization kernels: per-row distance tables against sub-space codebooks (the lookup
// tables of ADC and, with one sub-space, k-means assignment and coarse probing), the 8-bit ADC
// scan over flat codes and over IVF lists with a fused top-k, and exact re-ranking of candidates.
//
// Scores follow one convention inside the kernels: lower is better. For metric l2 a score is the
// squared distance; for metric ip it is the negated inner product (Python negates it back).
// Missing results (fewer than k candidates) are score +inf, row -1.
#pragma once
#include <cstdint>

#include "common/dispatch.h"
#include "common/view.h"

namespace hotops {

enum class AnnMetric : int { l2 = 0, ip = 1 };

// m sub-space codebooks of ksub centroids each, over sub-vectors of dsub floats, stored transposed
// as ct (m, dsub, ksub) so one row's distances to all ksub centroids are ksub-wide vector FMAs;
// cterm (m, ksub) holds ||c||^2 for l2 and is ignored for ip.
struct AnnCodebooks {
  View ct, cterm;
  AnnMetric metric = AnnMetric::l2;
  int64_t m() const { return ct.size(0); }
  int64_t dsub() const { return ct.size(1); }
  int64_t ksub() const { return ct.size(2); }
};

struct AnnTables {  // out[i, s, j] = score of x[i]'s sub-vector s against centroid j of sub-space s
  View x;           // (n, m * dsub) float32
  AnnCodebooks cb;
  View out;  // (n, m, S) float32, S >= ksub (the scans take S = 256; Python pads with +inf)
  int threads = 1;
};

struct AnnNearest {  // the k best centroids per row and sub-space (encoding, k-means, probing)
  View x;            // (n, m * dsub) float32
  AnnCodebooks cb;
  View out_idx;    // (n, m, k) int64, best first
  View out_score;  // (n, m, k) float32
  int threads = 1;
};

struct AnnPqScan {  // flat PQ: the k rows with the lowest sum_s tables[q, s, codes[row, s]]
  View tables;      // (nq, m, 256) float32; entries past ksub are +inf
  View codes;       // (N, m) uint8
  View allow;       // (N,) uint8 row filter, or absent
  View out_score;   // (nq, k) float32, ascending
  View out_row;     // (nq, k) int64
  int threads = 1;
};

struct AnnIvfScan {  // IVF-PQ: residual tables per probed list, then the same scan over its rows
  View q;            // (nq, d) float32
  View coarse;       // (nlist, d) float32 list centroids
  View probes;       // (nq, nprobe) int64 lists to scan (-1 = none)
  AnnCodebooks cb;   // codebooks of the residuals
  View codes;        // (N, m) uint8, rows grouped by list
  View offsets;      // (nlist + 1,) int64: list l holds rows [offsets[l], offsets[l + 1])
  View allow;        // (N,) uint8, or absent
  View list_tables;  // l2, or absent: (nlist, m, ksub) float32, 2 <c_l,s, codebook_s,j>; a list's table
                     // is then the query's own table plus this one (faiss's precomputed tables)
  View out_score, out_row;  // (nq, k)
  int threads = 1;
};

// 4-bit fast-scan over IVF lists (a flat index is one list with a zero centroid). Codes are packed
// in blocks of 32 vectors: block byte [s * 16 + j] holds vector j's code for sub-space s in its low
// nibble and vector 16 + j's in its high nibble; sub-spaces are padded to mp, a multiple of 4, with
// code 0. Per list, the float tables are quantized to uint8 (per sub-space offset, one scale), looked
// up 16 at a time with byte shuffles and summed in uint16; rows whose approximate score beats the
// heap's bound enter the top-k with score = offsets + sum / scale.
struct AnnFastScan {
  View q, coarse, probes;  // as AnnIvfScan
  AnnCodebooks cb;         // ksub = 16, m <= 128 (uint16 sums stay below 2^15)
  View list_tables;        // l2: (nlist, m, 16) float32, 2 <c_l,s, codebook_s,j>, so that a list's table is
                           // the query's table plus this one (faiss's precomputed tables)
  View packed;             // (blocks, mp * 16) uint8
  View block_offsets;      // (nlist + 1,) int64: list l owns blocks [block_offsets[l], block_offsets[l + 1])
  View offsets;            // (nlist + 1,) int64: list l owns rows [offsets[l], offsets[l + 1])
  View allow;              // (N,) uint8, or absent
  View out_score, out_row;
  int threads = 1;
};

struct AnnRerank {  // exact scores of candidate rows, plus fusion * their first-stage score
  View q;           // (nq, d) float32
  View base;        // (N, d) float32 or float16 (memory-mapped stores included)
  View cand;        // (nq, C) int64 rows into base (-1 = none)
  View cand_score;  // (nq, C) float32 first-stage scores, or absent
  float fusion = 0.0f;
  AnnMetric metric = AnnMetric::l2;
  View out_score, out_row;  // (nq, k)
  int threads = 1;
};

// Validation (check.cpp): shapes, dtypes, strides and index ranges; throw hotops::Error.
void check(const AnnTables& a);
void check(const AnnNearest& a);
void check(const AnnPqScan& a);
void check(const AnnIvfScan& a);
void check(const AnnRerank& a);
void check(const AnnFastScan& a);

HOTOPS_FOR_EACH_ISA(void ann_tables(const AnnTables& a); void ann_nearest(const AnnNearest& a);
                    void ann_pq_scan(const AnnPqScan& a); void ann_ivf_scan(const AnnIvfScan& a);
                    void ann_rerank(const AnnRerank& a); void ann_fastscan(const AnnFastScan& a);)

// k-means update step (kmeans.cpp, baseline code): centroids = mean of the rows assigned to them;
// an empty cluster takes a slightly perturbed copy of the largest cluster's centroid, which then
// gives up half its weight, so k-means never loses a centroid.
void kmeans_update(const View& x, const View& assign, const View& centroids);

}  // namespace hotops
