// Python bindings of the PQ kernels. Arrays arrive through DLPack (NumPy or torch alike); each
// call validates its views, then releases the GIL for the kernel.
#include <cerrno>
#include <memory>
#include <system_error>

#include "ann/cpu.h"
#include "common/mapguard.h"
#include "common/pyargs.h"

namespace py = pybind11;

namespace hotops {
namespace {

AnnMetric parse_metric(const std::string& metric) {
  if (metric == "l2") return AnnMetric::l2;
  if (metric == "ip") return AnnMetric::ip;
  fail("metric must be \"l2\" or \"ip\", got \"", metric, "\"");
}

AnnCodebooks codebooks(ViewArgs& view, const py::object& ct, const py::object& cterm,
                       const std::string& metric) {
  AnnCodebooks cb;
  cb.ct = view(ct, "codebooks");
  cb.cterm = view(cterm, "codebook norms");
  cb.metric = parse_metric(metric);
  return cb;
}

}  // namespace

void bind_ann(py::module_& m) {
  py::class_<MappedFile, std::shared_ptr<MappedFile>>(
      m, "MappedFile", py::buffer_protocol(),
      "A file mapped copy-on-write whose pages read as zeros (instead of raising SIGBUS) if the file "
      "is truncated under the mapping; changed() says whether that, or a change of size or mtime, "
      "happened. The buffer is the whole file, writable (copy-on-write, never written back).")
      .def(py::init([](const py::bytes& path) {
             const std::string p = path;
             try {
               return std::make_shared<MappedFile>(p);
             } catch (const std::system_error& e) {
               errno = e.code().value();
               PyErr_SetFromErrnoWithFilename(PyExc_OSError, p.c_str());
               throw py::error_already_set();
             }
           }),
           py::arg("path"))
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("faults", &MappedFile::faults)
      .def("changed", &MappedFile::changed,
           "Empty if the mapping still shows the file as mapped; else why not.")
      .def("release", &MappedFile::release, py::arg("offset"), py::arg("length"),
           "Drop the resident pages inside the byte range (read again when next touched).")
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(f.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {py::ssize_t(f.size())}, {py::ssize_t(1)}, false);
      });
  m.def("mapguard_total_faults", &mapguard::total_faults,
        "Pages of hotops' mappings replaced by zero pages after SIGBUS, since the process started.");
  m.def(
      "ann_tables",
      [](py::object x, py::object ct, py::object cterm, const std::string& metric, py::object out,
         int threads) {
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
      py::arg("x"), py::arg("ct"), py::arg("cterm"), py::arg("metric"), py::arg("out_idx"),
      py::arg("out_score"), py::arg("threads"),
      "The k best centroids per row and sub-space (encode, k-means assign, probe).");
  m.def(
      "ann_pq_scan",
      [](py::object tables, py::object codes, py::object allow, py::object out_score, py::object out_row,
         int threads) {
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
         const std::string& metric, py::object codes, py::object offsets, py::object allow,
         py::object out_score, py::object out_row, int threads, py::object list_tables) {
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
      py::arg("list_tables"), py::arg("packed"), py::arg("block_offsets"), py::arg("offsets"),
      py::arg("allow"), py::arg("out_score"), py::arg("out_row"), py::arg("threads"),
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
      py::arg("q"), py::arg("base"), py::arg("cand"), py::arg("cand_score"), py::arg("fusion"),
      py::arg("metric"), py::arg("out_score"), py::arg("out_row"), py::arg("threads"),
      "Exact re-rank of candidate rows (float32 or float16 store) with optional score fusion.");
  m.def(
      "ann_kmeans_update",
      [](py::object x, py::object assign, py::object centroids) {
        ViewArgs view;
        View xv = view(x, "training vectors"), av = view(assign, "assignments"),
             cv = view(centroids, "centroids");
        py::gil_scoped_release nogil;
        kmeans_update(xv, av, cv);
      },
      py::arg("x"), py::arg("assign"), py::arg("centroids"),
      "k-means update: centroids = means of their rows; empty clusters split the largest.");
}

}  // namespace hotops
