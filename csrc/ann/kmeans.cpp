// The k-means update step (baseline code: a single pass over the data, memory-bound). The
// assignment step, where the time goes, is ann_nearest with one sub-space.
#include <algorithm>
#include <cstring>
#include <vector>

#include "ann/cpu.h"

namespace hotops {

void kmeans_update(const View& x, const View& assign, const View& centroids) {
  check_view(x, "training vectors", 2, {DType::f32});
  check_rows_contiguous(x, "training vectors");
  check_view(centroids, "centroids", 2, {DType::f32});
  check_contiguous(centroids, "centroids");
  check_view(assign, "assignments", 1, {DType::i64});
  check_contiguous(assign, "assignments");
  const int64_t n = x.size(0), d = x.size(1), k = centroids.size(0);
  HOTOPS_CHECK(centroids.size(1) == d, "centroids have ", centroids.size(1), " columns, expected ", d);
  HOTOPS_CHECK(assign.size(0) == n, "assignments have ", assign.size(0), " entries, expected ", n);
  HOTOPS_CHECK(k >= 1, "k-means needs at least one centroid");
  const int64_t* a = assign.ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    HOTOPS_CHECK(a[i] >= 0 && a[i] < k, "assignment ", a[i], " of row ", i, " is not a centroid (0..", k - 1,
                 ")");

  std::vector<double> sum(static_cast<size_t>(k * d), 0.0);
  std::vector<double> count(static_cast<size_t>(k), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x.ptr<float>() + i * x.stride(0);
    double* s = sum.data() + a[i] * d;
    for (int64_t j = 0; j < d; ++j) s[j] += row[j];
    count[a[i]] += 1.0;
  }
  float* c = centroids.ptr<float>();
  for (int64_t j = 0; j < k; ++j) {
    if (count[j] == 0.0) continue;
    for (int64_t t = 0; t < d; ++t) c[j * d + t] = static_cast<float>(sum[j * d + t] / count[j]);
  }
  // Empty clusters split the largest one: both halves move apart by a small relative step.
  constexpr float kEps = 1.0f / 1024.0f;
  for (int64_t j = 0; j < k; ++j) {
    if (count[j] != 0.0) continue;
    const int64_t big = std::max_element(count.begin(), count.end()) - count.begin();
    if (count[big] < 2.0) break;  // fewer distinct rows than centroids: nothing left to split
    for (int64_t t = 0; t < d; ++t) {
      const float v = c[big * d + t];
      const float step = (t % 2 == 0 ? kEps : -kEps) * (v != 0.0f ? v : 1.0f);
      c[j * d + t] = v + step;
      c[big * d + t] = v - step;
    }
    count[j] = count[big] / 2;
    count[big] -= count[j];
  }
}

}  // namespace hotops
