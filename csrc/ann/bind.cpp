// Python bindings of the PQ kernels. Arrays arrive through DLPack (NumPy or torch alike); each
// call validates its views, then releases the GIL for the kernel.
#include "ann/cpu.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {
namespace {

AnnMetric parse_metric(const std::string& metric) {
  if (metric == "l2") return AnnMetric::l2;
  if (metric == "ip") return AnnMetric::ip;
  fail("metric must be \"l2\" or \"ip\", got \"", metric, "\"");
}

AnnCodebooks codebooks(ViewArgs& view, const py::object& ct, const py::object& cterm, const std::string& metric) {
  AnnCodebooks cb;
  cb.ct = view(ct, "codebooks");
  cb.cterm = view(cterm, "codebook norms");
  cb.metric = parse_metric(metric);
  return cb;
}

template <typename Args, typename Kernel>
void launch(const Args& a, Kernel kernel) {
  check(a);
  py::gil_scoped_release nogil;
  kernel(a);
}

}  // namespace

void bind_ann(py::module_& m) {
  m.def(
      "ann_tables",
      [](py::object x, py::object ct, py::object cterm, const std::string& metric, py::object out, int threads) {
        ViewArgs view;
        AnnTables a;
        a.x = view(x, "vectors");
        a.cb = codebooks(view, ct, cterm, metric);
        a.out = view(out, "tables");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_tables));
      },
      py::arg("x"), py::arg("ct"), py::arg("cterm"), py::arg("metric"), py::arg("out"), py::arg("threads"),
      "Per-row distance tables against sub-space codebooks ct (m, dsub, ksub); see csrc/ann/cpu.h.");
  m.def(
      "ann_nearest",
      [](py::object x, py::object ct, py::object cterm, const std::string& metric, py::object out_idx,
         py::object out_score, int threads) {
        ViewArgs view;
        AnnNearest a;
        a.x = view(x, "vectors");
        a.cb = codebooks(view, ct, cterm, metric);
        a.out_idx = view(out_idx, "nearest indices");
        a.out_score = view(out_score, "nearest scores");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_nearest));
      },
      py::arg("x"), py::arg("ct"), py::arg("cterm"), py::arg("metric"), py::arg("out_idx"), py::arg("out_score"),
      py::arg("threads"), "The k best centroids per row and sub-space (encode, k-means assign, probe).");
  m.def(
      "ann_pq_scan",
      [](py::object tables, py::object codes, py::object allow, py::object out_score, py::object out_row, int threads) {
        ViewArgs view;
        AnnPqScan a;
        a.tables = view(tables, "tables");
        a.codes = view(codes, "codes");
        a.allow = view(allow, "allow mask");
        a.out_score = view(out_score, "result scores");
        a.out_row = view(out_row, "result rows");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_pq_scan));
      },
      py::arg("tables"), py::arg("codes"), py::arg("allow"), py::arg("out_score"), py::arg("out_row"),
      py::arg("threads"), "ADC scan of flat 8-bit PQ codes with a fused top-k.");
  m.def(
      "ann_ivf_scan",
      [](py::object q, py::object coarse, py::object probes, py::object ct, py::object cterm,
         const std::string& metric, py::object codes, py::object offsets, py::object allow, py::object out_score,
         py::object out_row, int threads, py::object list_tables) {
        ViewArgs view;
        AnnIvfScan a;
        a.q = view(q, "queries");
        a.coarse = view(coarse, "coarse centroids");
        a.probes = view(probes, "probes");
        a.cb = codebooks(view, ct, cterm, metric);
        a.codes = view(codes, "codes");
        a.offsets = view(offsets, "list offsets");
        a.allow = view(allow, "allow mask");
        a.list_tables = view(list_tables, "list tables");
        a.out_score = view(out_score, "result scores");
        a.out_row = view(out_row, "result rows");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_ivf_scan));
      },
      py::arg("q"), py::arg("coarse"), py::arg("probes"), py::arg("ct"), py::arg("cterm"), py::arg("metric"),
      py::arg("codes"), py::arg("offsets"), py::arg("allow"), py::arg("out_score"), py::arg("out_row"),
      py::arg("threads"), py::arg("list_tables") = py::none(),
      "IVF-PQ scan: per probed list a residual table (or, for l2 with list_tables, the query's table "
      "plus the list's precomputed one), ADC scan, fused top-k.");
  m.def(
      "ann_fastscan",
      [](py::object q, py::object coarse, py::object probes, py::object ct, py::object cterm,
         const std::string& metric, py::object list_tables, py::object packed, py::object block_offsets,
         py::object offsets, py::object allow, py::object out_score, py::object out_row, int threads) {
        ViewArgs view;
        AnnFastScan a;
        a.q = view(q, "queries");
        a.coarse = view(coarse, "coarse centroids");
        a.probes = view(probes, "probes");
        a.cb = codebooks(view, ct, cterm, metric);
        a.list_tables = view(list_tables, "list tables");
        a.packed = view(packed, "packed codes");
        a.block_offsets = view(block_offsets, "block offsets");
        a.offsets = view(offsets, "list offsets");
        a.allow = view(allow, "allow mask");
        a.out_score = view(out_score, "result scores");
        a.out_row = view(out_row, "result rows");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_fastscan));
      },
      py::arg("q"), py::arg("coarse"), py::arg("probes"), py::arg("ct"), py::arg("cterm"), py::arg("metric"),
      py::arg("list_tables"), py::arg("packed"), py::arg("block_offsets"), py::arg("offsets"), py::arg("allow"), py::arg("out_score"),
      py::arg("out_row"), py::arg("threads"),
      "4-bit fast-scan over IVF lists: uint8 tables in SIMD registers, uint16 sums, fused top-k.");
  m.def(
      "ann_rerank",
      [](py::object q, py::object base, py::object cand, py::object cand_score, float fusion,
         const std::string& metric, py::object out_score, py::object out_row, int threads) {
        ViewArgs view;
        AnnRerank a;
        a.q = view(q, "queries");
        a.base = view(base, "stored vectors");
        a.cand = view(cand, "candidates");
        a.cand_score = view(cand_score, "candidate scores");
        a.fusion = fusion;
        a.metric = parse_metric(metric);
        a.out_score = view(out_score, "result scores");
        a.out_row = view(out_row, "result rows");
        a.threads = threads;
        launch(a, HOTOPS_DISPATCH(ann_rerank));
      },
      py::arg("q"), py::arg("base"), py::arg("cand"), py::arg("cand_score"), py::arg("fusion"), py::arg("metric"),
      py::arg("out_score"), py::arg("out_row"), py::arg("threads"),
      "Exact re-rank of candidate rows (float32 or float16 store) with optional score fusion.");
  m.def(
      "ann_kmeans_update",
      [](py::object x, py::object assign, py::object centroids) {
        ViewArgs view;
        View xv = view(x, "training vectors"), av = view(assign, "assignments"), cv = view(centroids, "centroids");
        py::gil_scoped_release nogil;
        kmeans_update(xv, av, cv);
      },
      py::arg("x"), py::arg("assign"), py::arg("centroids"),
      "k-means update: centroids = means of their rows; empty clusters split the largest.");
}

}  // namespace hotops
