// Fused streaming attention with exact statistics: the "full-row block" design on the CPU.
//
// One work item is (sequence, KV head, block of query rows) with the rows of every query head of
// that KV head stacked, so keys and values are read once per group and never copied per head.
// For each item:
//   1. one GEMM writes the scaled scores of the stacked rows against the keys the block can see
//      into a per-thread buffer sized to stay in the cache;
//   2. per row, while it is in cache: softcap, mask (reach, padding), max (with the learned sink),
//      one sweep for exp, the row sum and sum e*(s - m) (the entropy term), then one sweep that
//      normalises and adds the row, weighted, into the thread's column sums;
//   3. one GEMM P @ V into the output rows.
// Every row is finished (its full log-sum-exp known) before its probabilities are used, so the
// column sums are exact: no online rescaling is mixed into them. Per-thread column sums are
// reduced at the end. fp32 only; the exponential is ATen's vectorised exp_u20 (the one its flash
// kernel uses).

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

// The BLAS that libtorch links (MKL on x86 wheels) exports Fortran sgemm_; called from inside the
// kernel's own parallel region it runs on the calling thread. at::mm_out there would start the
// GEMM's own threads on top of ours (measured: 10x slower with 2 threads), so it is only the
// fallback where no sgemm_ is linked, and then the work items run one thread at a time.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread setting: its GEMMs on a worker thread of ours use that thread only
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace {

// row-major C[M, N] = A[M, K] @ B[N, K]^T (trans_b) or A[M, K] @ B[K, N]
void gemm_rows(const float* a, const float* b, float* c, int64_t M, int64_t N, int64_t K, bool trans_b) {
  if (sgemm_ != nullptr) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int lda = static_cast<int>(trans_b ? K : N), ldb = static_cast<int>(K), ldc = static_cast<int>(N);
    const float one = 1.f, zero = 0.f;
    sgemm_(trans_b ? "T" : "N", "N", &m, &n, &k, &one, b, &lda, a, &ldb, &zero, c, &ldc);
    return;
  }
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor out = at::from_blob(c, {M, N}, opts);
  at::Tensor left = at::from_blob(const_cast<float*>(a), {M, K}, opts);
  at::Tensor right = trans_b ? at::from_blob(const_cast<float*>(b), {N, K}, opts).t()
                             : at::from_blob(const_cast<float*>(b), {K, N}, opts);
  at::mm_out(out, left, right);
}

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kStackedRows = 128;
constexpr float kLowest = -1e30f;  // masked scores after subtracting the max: exp gives 0, 0 * x stays 0

// Keys [lo, hi) that a query at key-axis position pos sees (transformers' semantics: causal with an
// optional window of `window` keys including itself; bidirectional with |i - k| <= window).
inline void key_range(bool causal, int64_t window, int64_t pos, int64_t n_keys, int64_t& lo, int64_t& hi) {
  if (causal) {
    hi = std::min(n_keys, pos + 1);
    lo = window < 0 ? 0 : std::max<int64_t>(0, pos - window + 1);
  } else if (window < 0) {
    lo = 0;
    hi = n_keys;
  } else {
    lo = std::max<int64_t>(0, pos - window);
    hi = std::min(n_keys, pos + window + 1);
  }
  hi = std::max(hi, lo);
}

inline float reduce_max(const float* x, int64_t n) {
  int64_t j = 0;
  float m = -std::numeric_limits<float>::infinity();
  if (n >= Vec::size()) {
    Vec vm(m);
    for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
    float lanes[Vec::size()];
    vm.store(lanes);
    for (int l = 0; l < Vec::size(); ++l) m = std::max(m, lanes[l]);
  }
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float lanes_sum(const Vec& v) {
  float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.f;
  for (int l = 0; l < Vec::size(); ++l) s += lanes[l];
  return s;
}

// x <- exp(max(x - m, lowest)); returns (sum e, sum e * (x - m)).
inline std::pair<double, double> exp_sweep(float* x, int64_t n, float m) {
  int64_t j = 0;
  Vec vsum(0.f), vdot(0.f), vm(m), vlow(kLowest);
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec d = at::vec::maximum(Vec::loadu(x + j) - vm, vlow);
    Vec e = d.exp_u20();
    vsum = vsum + e;
    vdot = at::vec::fmadd(e, d, vdot);
    e.store(x + j);
  }
  double sum = lanes_sum(vsum), dot = lanes_sum(vdot);
  if (j < n) {
    int64_t rest = n - j;
    Vec d = at::vec::maximum(Vec::loadu(x + j, rest) - vm, vlow);
    Vec e = d.exp_u20();
    float de[Vec::size()], dd[Vec::size()];
    e.store(de, rest);
    d.store(dd, rest);
    for (int64_t l = 0; l < rest; ++l) {
      sum += de[l];
      dot += double(de[l]) * dd[l];
    }
    e.store(x + j, rest);
  }
  return {sum, dot};
}

// x <- x * inv; column[k] += w * x[k] (w == 0: only the normalisation)
inline void normalise_sweep(float* x, int64_t n, float inv, float* column, float w) {
  int64_t j = 0;
  Vec vinv(inv), vw(w);
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec p = Vec::loadu(x + j) * vinv;
    p.store(x + j);
    if (column != nullptr) at::vec::fmadd(p, vw, Vec::loadu(column + j)).store(column + j);
  }
  for (; j < n; ++j) {
    x[j] *= inv;
    if (column != nullptr) column[j] += w * x[j];
  }
}

inline void softcap_sweep(float* x, int64_t n, float cap) {
  int64_t j = 0;
  Vec vc(cap), vinv(1.f / cap);
  for (; j + Vec::size() <= n; j += Vec::size()) (((Vec::loadu(x + j) * vinv).tanh()) * vc).store(x + j);
  for (; j < n; ++j) x[j] = std::tanh(x[j] / cap) * cap;
}

}  // namespace

// Returns {out [B, H, Nq, Dv], column_sum [B, H, Nk], row_sum, plogp, probe [B, H, Nq]}; the last four
// are empty unless `stats`. Queries are the last Nq positions of the Nk keys.
std::vector<at::Tensor> fused_attention(
    const at::Tensor& query_in,
    const at::Tensor& key_in,
    const at::Tensor& value_in,
    double scaling,
    double softcap,  // <= 0: none
    const c10::optional<at::Tensor>& sinks_in,  // [H]
    bool causal,
    int64_t window,  // < 0: none
    const c10::optional<at::Tensor>& key_real_in,  // [B, Nk] bool
    const c10::optional<at::Tensor>& row_weight_in,  // [B, Nq] float
    const c10::optional<at::Tensor>& probe_in,  // [B] int64: a column whose probability each row reports
    bool stats,
    int64_t block_entries) {
  TORCH_CHECK(query_in.scalar_type() == at::kFloat && key_in.scalar_type() == at::kFloat &&
                  value_in.scalar_type() == at::kFloat,
              "fused attention runs fp32 only");
  TORCH_CHECK(query_in.dim() == 4 && key_in.dim() == 4 && value_in.dim() == 4, "expected [batch, head, pos, dim]");
  const at::Tensor query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), Nq = query.size(2), D = query.size(3);
  const int64_t KV = key.size(1), Nk = key.size(2), Dv = value.size(3);
  TORCH_CHECK(H % KV == 0 && key.size(0) == B && value.size(0) == B && value.size(2) == Nk && key.size(3) == D,
              "query, key and value shapes do not match");
  TORCH_CHECK(Nq <= Nk, "more queries than keys");
  const int64_t G = H / KV;
  const bool has_sinks = sinks_in.has_value() && sinks_in->defined();
  const at::Tensor sinks = has_sinks ? sinks_in->to(at::kFloat).contiguous() : at::Tensor();
  const bool has_pad = key_real_in.has_value() && key_real_in->defined();
  const at::Tensor key_real = has_pad ? key_real_in->to(at::kBool).contiguous() : at::Tensor();
  const bool has_weight = row_weight_in.has_value() && row_weight_in->defined();
  const at::Tensor row_weight = has_weight ? row_weight_in->to(at::kFloat).contiguous() : at::Tensor();
  const bool has_probe = probe_in.has_value() && probe_in->defined();
  const at::Tensor probe_col = has_probe ? probe_in->to(at::kLong).contiguous() : at::Tensor();

  auto opts = query.options();
  at::Tensor out = at::empty({B, H, Nq, Dv}, opts);
  at::Tensor row_sum, plogp, probe, column;
  if (stats) {
    row_sum = at::empty({B, H, Nq}, opts);
    plogp = at::empty({B, H, Nq}, opts);
    probe = at::zeros({B, H, Nq}, opts);
  }

  // rows per item: about 128 stacked rows (each K/V row read feeds 128 GEMM rows; measured best on
  // SmolLM2 at 2,048 and 8,192 keys), fewer when that would pass block_entries scores
  const int64_t per_row = std::max<int64_t>(1, G * Nk);
  const int64_t R = std::max<int64_t>(
      1, std::min<int64_t>({Nq, (kStackedRows + G - 1) / G, std::max<int64_t>(1, block_entries / per_row)}));
  const int64_t n_blocks = (Nq + R - 1) / R;
  const int64_t n_items = B * KV * n_blocks;
  const int64_t n_threads =
      sgemm_ == nullptr ? 1 : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  const int64_t M_max = G * R;

  std::vector<at::Tensor> thread_columns(n_threads);
  if (stats)
    for (auto& c : thread_columns) c = at::zeros({B, H, Nk}, opts);
  std::atomic<int64_t> next{0};

  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  const float* sink = has_sinks ? sinks.data_ptr<float>() : nullptr;
  const bool* real = has_pad ? key_real.data_ptr<bool>() : nullptr;
  const float* weight = has_weight ? row_weight.data_ptr<float>() : nullptr;
  const int64_t* probe_at = has_probe ? probe_col.data_ptr<int64_t>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t offset = Nk - Nq;  // key-axis position of query row 0

  at::parallel_for(0, n_threads, 1, [&](int64_t t0, int64_t t1) {
    const int saved_mkl = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t t = t0; t < t1; ++t) {
      at::Tensor qbuf = at::empty({M_max, D}, opts);
      at::Tensor sbuf = at::empty({M_max * Nk}, opts);
      at::Tensor obuf = at::empty({M_max, Dv}, opts);
      float* column_base = stats ? thread_columns[t].data_ptr<float>() : nullptr;
      for (int64_t item = next++; item < n_items; item = next++) {
        // the costliest blocks (the last rows of a causal layer) first
        const int64_t block = n_blocks - 1 - item / (B * KV);
        const int64_t b = (item % (B * KV)) / KV, kvh = item % KV;
        const int64_t r0 = block * R, r1 = std::min(Nq, r0 + R), rows = r1 - r0, M = G * rows;
        int64_t lo, hi, lo_last, hi_last;
        key_range(causal, window, offset + r0, Nk, lo, hi);
        key_range(causal, window, offset + r1 - 1, Nk, lo_last, hi_last);
        lo = std::min(lo, lo_last);
        hi = std::max(hi, hi_last);
        const int64_t n = hi - lo;
        float* qb = qbuf.data_ptr<float>();
        for (int64_t g = 0; g < G; ++g) {
          const float* src = q + (((b * H + kvh * G + g) * Nq) + r0) * D;
          float* dst = qb + g * rows * D;
          for (int64_t i = 0; i < rows * D; ++i) dst[i] = src[i] * static_cast<float>(scaling);
        }
        float* s = sbuf.data_ptr<float>();
        if (n > 0) gemm_rows(qb, k + ((b * KV + kvh) * Nk + lo) * D, s, M, n, D, true);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = kvh * G + g;
          float* column = stats ? column_base + (b * H + h) * Nk + lo : nullptr;
          for (int64_t r = 0; r < rows; ++r) {
            float* x = s + (g * rows + r) * n;
            const int64_t qi = r0 + r, pos = offset + qi;
            int64_t a, e;
            key_range(causal, window, pos, Nk, a, e);
            a = std::min(std::max(a, lo) - lo, n);
            e = std::max(std::min(e, hi) - lo, a);
            std::fill(x, x + a, 0.f);
            std::fill(x + e, x + n, 0.f);
            const int64_t width = e - a;
            float* xs = x + a;
            if (softcap > 0) softcap_sweep(xs, width, static_cast<float>(softcap));
            if (real != nullptr) {
              const bool* rr = real + b * Nk + lo + a;
              for (int64_t j = 0; j < width; ++j)
                if (!rr[j]) xs[j] = -std::numeric_limits<float>::infinity();
            }
            float m = reduce_max(xs, width);
            const bool any = m > -std::numeric_limits<float>::infinity();
            const float sink_logit = sink != nullptr ? sink[h] : 0.f;
            double total, row_plogp, row_total;
            if (!any) {
              // no visible real key: the sink takes everything, or the row is uniform over its reach
              // (a padded query row, whose values are never used)
              if (sink != nullptr || width == 0) {
                std::fill(xs, xs + width, 0.f);
                row_total = 0.0;
                row_plogp = 0.0;
              } else {
                std::fill(xs, xs + width, 1.f / width);
                row_total = 1.0;
                row_plogp = -std::log(double(width));
              }
              if (stats) {
                const int64_t at = (b * H + h) * Nq + qi;
                row_sum.data_ptr<float>()[at] = static_cast<float>(row_total);
                plogp.data_ptr<float>()[at] = static_cast<float>(row_plogp);
              }
              continue;
            }
            if (sink != nullptr) m = std::max(m, sink_logit);
            auto [sum, dot] = exp_sweep(xs, width, m);
            const double sink_e = sink != nullptr ? std::exp(double(sink_logit) - m) : 0.0;
            total = sum + sink_e;
            const double log_total = std::log(total);
            const float w = weight != nullptr ? weight[b * Nq + qi] : 1.f;
            normalise_sweep(xs, width, static_cast<float>(1.0 / total), (column != nullptr && w != 0.f) ? column + a : nullptr, w);
            if (stats) {
              const int64_t at = (b * H + h) * Nq + qi;
              row_total = sum / total;
              // sum_k p log p = (sum e (s - m)) / Z - log Z * sum / Z, plus the sink's p log p
              row_plogp = dot / total - log_total * row_total;
              if (sink != nullptr) {
                const double ps = sink_e / total;
                row_plogp += ps * (double(sink_logit) - m - log_total);
              }
              row_sum.data_ptr<float>()[at] = static_cast<float>(row_total);
              plogp.data_ptr<float>()[at] = static_cast<float>(row_plogp);
              if (probe_at != nullptr) {
                const int64_t c = probe_at[b] - lo;
                if (c >= a && c < e) probe.data_ptr<float>()[at] = xs[c - a];
              }
            }
          }
        }
        float* ob = obuf.data_ptr<float>();
        if (n > 0)
          gemm_rows(s, v + ((b * KV + kvh) * Nk + lo) * Dv, ob, M, Dv, n, false);
        else
          std::fill(ob, ob + M * Dv, 0.f);
        for (int64_t g = 0; g < G; ++g) {
          float* dst = o + (((b * H + kvh * G + g) * Nq) + r0) * Dv;
          std::copy(ob + g * rows * Dv, ob + (g + 1) * rows * Dv, dst);
        }
      }
    }
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved_mkl);
  });
  if (stats) {
    column = thread_columns[0];
    for (int64_t t = 1; t < n_threads; ++t) column.add_(thread_columns[t]);
    return {out, column, row_sum, plogp, probe};
  }
  return {out};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_attention", &fused_attention, "Blocked attention with exact column sums, row sums and sum p log p");
}
