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
//
// Edits, applied to each row while it is in cache (what tokext's interventions do to a layer, in
// the order the streaming engine runs them: score edits, softmax, one pattern edit):
//   - score affine per head: s * scale[h] + shift[h] on the visible scores (a softmax temperature);
//   - key-set gains: a 0/1 key mask [B, H, Nk] and, from each row's mass on and off the masked keys,
//     one gain on them and one elsewhere (rebalance with renormalisation, plain scale, ACT's
//     calibration);
//   - sparse boosts: per row, a list of key positions whose probability is multiplied by gain[h],
//     optionally renormalised to the row's sum (early-layer emulation);
//   - recording: per row, the key positions whose probability exceeds a threshold (the mask that
//     early-layer emulation reads from its source layer).
// The file is compiled with -fopenmp: at::parallel_for is an inline OpenMP region in ATen's headers.

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

// x <- x * (mask ? on : off). Selected, not interpolated: off + mask * (on - off) would cancel
// catastrophically when the gains are far apart (ACT's gain off the sinks of a row with almost
// nothing off them is ~1e4, on them 0.4)
inline void masked_scale_sweep(float* x, int64_t n, float off, float on, const float* mask) {
  int64_t j = 0;
  Vec voff(off), von(on), half(0.5f);
  for (; j + Vec::size() <= n; j += Vec::size())
    (Vec::loadu(x + j) * Vec::blendv(voff, von, Vec::loadu(mask + j) > half)).store(x + j);
  for (; j < n; ++j) x[j] *= mask[j] > 0.5f ? on : off;
}

// (sum x * mask, sum x * (1 - mask)), both summed directly so that a row with no mass off the
// masked keys gets exactly 0 there
inline std::pair<double, double> masked_sums(const float* x, int64_t n, const float* mask) {
  int64_t j = 0;
  Vec von(0.f), voff(0.f), one(1.f);
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec e = Vec::loadu(x + j), m = Vec::loadu(mask + j);
    von = at::vec::fmadd(e, m, von);
    voff = at::vec::fmadd(e, one - m, voff);
  }
  double on = lanes_sum(von), off = lanes_sum(voff);
  for (; j < n; ++j) {
    on += double(x[j]) * mask[j];
    off += double(x[j]) * (1.f - mask[j]);
  }
  return {on, off};
}

inline void scale_sweep(float* x, int64_t n, float c) {
  int64_t j = 0;
  Vec vc(c);
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * vc).store(x + j);
  for (; j < n; ++j) x[j] *= c;
}

inline void affine_sweep(float* x, int64_t n, float a, float b) {
  int64_t j = 0;
  Vec va(a), vb(b);
  for (; j + Vec::size() <= n; j += Vec::size()) at::vec::fmadd(Vec::loadu(x + j), va, vb).store(x + j);
  for (; j < n; ++j) x[j] = x[j] * a + b;
}

// key-set gain modes (the values of `key_mode`)
constexpr int64_t kKeysNone = 0, kKeysRebalance = 1, kKeysScale = 2, kKeysCalibrate = 3;

inline void softcap_sweep(float* x, int64_t n, float cap) {
  int64_t j = 0;
  Vec vc(cap), vinv(1.f / cap);
  for (; j + Vec::size() <= n; j += Vec::size()) (((Vec::loadu(x + j) * vinv).tanh()) * vc).store(x + j);
  for (; j < n; ++j) x[j] = std::tanh(x[j] / cap) * cap;
}

}  // namespace

// Returns {out [B, H, Nq, Dv], column_sum [B, H, Nk], row_sum, plogp, probe [B, H, Nq], record_idx
// [B, H, Nq, record_cap] int32, record_n [B, H, Nq] int32, row_lse [B, H, Nq] float64: each row's log-sum-exp
// of its edited scores and the sink, +inf for a row without a visible real key}; tensors that were not asked for are empty
// (out without `output`, the statistics without `stats`, the record without `record_cap`). Queries
// are the last Nq positions of the Nk keys.
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
    int64_t block_entries,
    const c10::optional<at::Tensor>& score_scale_in,  // [H]: visible scores times this ...
    const c10::optional<at::Tensor>& score_shift_in,  // [H]: ... plus this, before the softmax
    const c10::optional<at::Tensor>& key_mask_in,  // [B, H, Nk] float 0/1: the keys of a key-set gain
    int64_t key_mode,  // kKeys*
    double key_param,  // the rebalance / plain scale, or ACT's beta
    double sink_scale,  // rebalance in a learned-sink layer: the sink's weight (1: the sink keeps its share)
    const c10::optional<at::Tensor>& boost_idx_in,  // [B, H, Nq, C] int32: key positions boosted in each row
    const c10::optional<at::Tensor>& boost_n_in,  // [B, H, Nq] int32: how many of them
    const c10::optional<at::Tensor>& boost_gain_in,  // [H]
    bool boost_renormalize,  // boosted rows rescaled to their sum before the boost
    double record_threshold,  // record the keys with probability > this ...
    bool record_exclude_self,  // ... but not the query's own key ...
    int64_t record_cap,  // ... at most this many per row (0: record nothing)
    bool output) {
  TORCH_CHECK(query_in.scalar_type() == at::kFloat && key_in.scalar_type() == at::kFloat &&
                  value_in.scalar_type() == at::kFloat,
              "fused attention runs fp32 only");
  TORCH_CHECK(query_in.dim() == 4 && key_in.dim() == 4 && value_in.dim() == 4, "expected [batch, head, pos, dim]");
  const at::Tensor query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const int64_t B = query.size(0), H = query.size(1), Nq = query.size(2), D = query.size(3);
  const int64_t KV = key.size(1), Nk = key.size(2), Dv = value.size(3);
  TORCH_CHECK(H % KV == 0 && key.size(0) == B && key.size(3) == D &&
                  (!output || (value.size(0) == B && value.size(1) == KV && value.size(2) == Nk)),
              "query, key and value shapes do not match");
  TORCH_CHECK(Nq <= Nk, "more queries than keys");
  const int64_t G = H / KV;
  auto given = [](const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  auto floats = [&](const c10::optional<at::Tensor>& t) {
    return given(t) ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor sinks = floats(sinks_in), row_weight = floats(row_weight_in);
  const at::Tensor score_scale = floats(score_scale_in), score_shift = floats(score_shift_in);
  const at::Tensor key_mask = key_mode != kKeysNone ? floats(key_mask_in) : at::Tensor();
  const at::Tensor boost_gain = floats(boost_gain_in);
  const at::Tensor key_real = given(key_real_in) ? key_real_in->to(at::kBool).contiguous() : at::Tensor();
  const at::Tensor probe_col = given(probe_in) ? probe_in->to(at::kLong).contiguous() : at::Tensor();
  const bool boosting = given(boost_idx_in) && given(boost_n_in) && given(boost_gain_in);
  const at::Tensor boost_idx = boosting ? boost_idx_in->to(at::kInt).contiguous() : at::Tensor();
  const at::Tensor boost_n = boosting ? boost_n_in->to(at::kInt).contiguous() : at::Tensor();
  TORCH_CHECK(key_mode == kKeysNone || (key_mask.defined() && key_mask.numel() == B * H * Nk),
              "a key-set gain needs a [batch, head, key] mask");
  TORCH_CHECK(!boosting || (boost_idx.dim() == 4 && boost_idx.size(2) == Nq && boost_n.numel() == B * H * Nq),
              "boosts need [batch, head, query, C] positions and [batch, head, query] counts");
  const int64_t boost_cap = boosting ? boost_idx.size(3) : 0;

  auto opts = query.options();
  at::Tensor out = output ? at::empty({B, H, Nq, Dv}, opts) : at::empty({0}, opts);
  at::Tensor row_sum, plogp, probe, column, record_idx, record_n, row_lse;
  if (stats) {
    row_lse = at::full({B, H, Nq}, std::numeric_limits<double>::infinity(), opts.dtype(at::kDouble));
    row_sum = at::empty({B, H, Nq}, opts);
    plogp = at::empty({B, H, Nq}, opts);
    probe = at::zeros({B, H, Nq}, opts);
  }
  if (record_cap > 0) {
    record_idx = at::empty({B, H, Nq, record_cap}, opts.dtype(at::kInt));
    record_n = at::zeros({B, H, Nq}, opts.dtype(at::kInt));
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
  const float* sink = sinks.defined() ? sinks.data_ptr<float>() : nullptr;
  const bool* real = key_real.defined() ? key_real.data_ptr<bool>() : nullptr;
  const float* weight = row_weight.defined() ? row_weight.data_ptr<float>() : nullptr;
  const int64_t* probe_at = probe_col.defined() ? probe_col.data_ptr<int64_t>() : nullptr;
  const float* sc_scale = score_scale.defined() ? score_scale.data_ptr<float>() : nullptr;
  const float* sc_shift = score_shift.defined() ? score_shift.data_ptr<float>() : nullptr;
  const float* kmask = key_mask.defined() ? key_mask.data_ptr<float>() : nullptr;
  const int32_t* b_idx = boosting ? boost_idx.data_ptr<int32_t>() : nullptr;
  const int32_t* b_n = boosting ? boost_n.data_ptr<int32_t>() : nullptr;
  const float* b_gain = boosting ? boost_gain.data_ptr<float>() : nullptr;
  int32_t* r_idx = record_cap > 0 ? record_idx.data_ptr<int32_t>() : nullptr;
  int32_t* r_n = record_cap > 0 ? record_n.data_ptr<int32_t>() : nullptr;
  float* o = output ? out.data_ptr<float>() : nullptr;
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
            const int64_t at = (b * H + h) * Nq + qi;  // this row in [B, H, Nq] outputs
            int64_t a, e;
            key_range(causal, window, pos, Nk, a, e);
            a = std::min(std::max(a, lo) - lo, n);
            e = std::max(std::min(e, hi) - lo, a);
            std::fill(x, x + a, 0.f);
            std::fill(x + e, x + n, 0.f);
            const int64_t width = e - a;
            float* xs = x + a;
            if (softcap > 0) softcap_sweep(xs, width, static_cast<float>(softcap));
            if (sc_scale != nullptr || sc_shift != nullptr)
              affine_sweep(xs, width, sc_scale != nullptr ? sc_scale[h] : 1.f, sc_shift != nullptr ? sc_shift[h] : 0.f);
            if (real != nullptr) {
              const bool* rr = real + b * Nk + lo + a;
              for (int64_t j = 0; j < width; ++j)
                if (!rr[j]) xs[j] = -std::numeric_limits<float>::infinity();
            }
            float m = reduce_max(xs, width);
            const bool any = m > -std::numeric_limits<float>::infinity();
            const float sink_logit = sink != nullptr ? sink[h] : 0.f;
            if (!any) {
              // no visible real key: the sink takes everything, or the row is uniform over its reach
              // (a padded query row, whose values are never used); edits and records leave it alone
              double row_total = 0.0, row_plogp = 0.0;
              if (sink != nullptr || width == 0) {
                std::fill(xs, xs + width, 0.f);
              } else {
                std::fill(xs, xs + width, 1.f / width);
                row_total = 1.0;
                row_plogp = -std::log(double(width));
              }
              if (stats) {
                row_sum.data_ptr<float>()[at] = static_cast<float>(row_total);
                plogp.data_ptr<float>()[at] = static_cast<float>(row_plogp);
              }
              continue;
            }
            if (sink != nullptr) m = std::max(m, sink_logit);
            auto [sum, dot] = exp_sweep(xs, width, m);
            const double sink_e = sink != nullptr ? std::exp(double(sink_logit) - m) : 0.0;
            const double total = sum + sink_e;
            const double inv = 1.0 / total;
            const float w = weight != nullptr ? weight[b * Nq + qi] : 1.f;
            if (kmask != nullptr) {
              // gains on and off the masked keys from the row's normalised masses t (on) and r (off)
              const float* mk = kmask + (b * H + h) * Nk + lo + a;
              auto [on_e, off_e] = masked_sums(xs, width, mk);
              const double t_mass = on_e * inv, r_mass = off_e * inv, s_mass = sink_e * inv;
              double on_gain = 1.0, off_gain = 1.0;
              if (key_mode == kKeysRebalance) {  // entries on the keys times scale, the row kept at its sum
                const double kept = t_mass + r_mass + s_mass, scaled = r_mass + key_param * t_mass + sink_scale * s_mass;
                if (scaled > 0) {
                  off_gain = kept / scaled;
                  on_gain = key_param * off_gain;
                }
              } else if (key_mode == kKeysScale) {
                on_gain = key_param;
              } else if (key_mode == kKeysCalibrate) {  // ACT: sinks times beta, the freed mass to the rest by weight
                const bool has_rest = r_mass > 0;
                const double beta = has_rest ? key_param : 1.0;
                on_gain = beta;
                off_gain = 1.0 + (1.0 - beta) * t_mass / (has_rest ? r_mass : 1.0);
              }
              masked_scale_sweep(xs, width, static_cast<float>(inv * off_gain), static_cast<float>(inv * on_gain), mk);
            } else {
              normalise_sweep(xs, width, static_cast<float>(inv), (column != nullptr && w != 0.f) ? column + a : nullptr,
                              w);
            }
            if (b_idx != nullptr) {
              // boost the listed keys of this row by the head's gain (positions are on the key axis)
              const int32_t* list = b_idx + at * boost_cap;
              const int64_t count = std::min<int64_t>(b_n[at], boost_cap);
              const float gain = b_gain[h];
              double boosted = 0.0;
              for (int64_t i = 0; i < count; ++i) {
                const int64_t c = int64_t(list[i]) - lo;
                if (c >= a && c < e) {
                  boosted += x[c];
                  x[c] *= gain;
                }
              }
              if (boost_renormalize) {  // back to the row's sum before the boost; a row summing to 0 stays 0
                const double before = sum * inv, after = before + (double(gain) - 1.0) * boosted;
                scale_sweep(xs, width, after > 0 ? static_cast<float>(before / after) : 0.f);
              }
            }
            if (r_idx != nullptr) {
              int32_t* list = r_idx + at * record_cap;
              int64_t count = 0;
              const float threshold = static_cast<float>(record_threshold);
              for (int64_t j = 0; j < width && count < record_cap; ++j)
                if (xs[j] > threshold && !(record_exclude_self && lo + a + j == pos))
                  list[count++] = static_cast<int32_t>(lo + a + j);
              r_n[at] = static_cast<int32_t>(count);
            }
            if (stats) {
              const double row_total = sum * inv;
              const double log_total = std::log(total);
              // sum_k p log p = (sum e (s - m)) / Z - log Z * sum / Z, plus the sink's p log p
              double row_plogp = dot * inv - log_total * row_total;
              if (sink != nullptr) {
                const double ps = sink_e * inv;
                row_plogp += ps * (double(sink_logit) - m - log_total);
              }
              row_sum.data_ptr<float>()[at] = static_cast<float>(row_total);
              plogp.data_ptr<float>()[at] = static_cast<float>(row_plogp);
              row_lse.data_ptr<double>()[at] = double(m) + log_total;
              if (probe_at != nullptr) {
                const int64_t c = probe_at[b] - lo;
                if (c >= a && c < e) probe.data_ptr<float>()[at] = xs[c - a];
              }
            }
          }
        }
        if (!output) continue;
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
  auto none = at::empty({0}, opts);
  if (stats) {
    column = thread_columns[0];
    for (int64_t t = 1; t < n_threads; ++t) column.add_(thread_columns[t]);
  }
  auto or_none = [&](const at::Tensor& t) { return t.defined() ? t : none; };
  return {out, or_none(column), or_none(row_sum), or_none(plogp), or_none(probe), or_none(record_idx),
          or_none(record_n), or_none(row_lse)};
}

// The number of threads that one at::parallel_for region of this extension runs on: the check that
// it was compiled with OpenMP (without -fopenmp the region silently runs on one thread).
int64_t parallel_threads() {
  std::vector<int> seen(std::max(1, at::get_num_threads()), 0);
  at::parallel_for(0, static_cast<int64_t>(seen.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) seen[t] = at::get_thread_num() + 1;
  });
  std::sort(seen.begin(), seen.end());
  return std::unique(seen.begin(), seen.end()) - seen.begin();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("fused_attention", &fused_attention,
        "Blocked attention with exact column sums, row sums and sum p log p, and in-row edits", py::arg("query"),
        py::arg("key"), py::arg("value"), py::arg("scaling"), py::arg("softcap"), py::arg("sinks"), py::arg("causal"),
        py::arg("window"), py::arg("key_real"), py::arg("row_weight"), py::arg("probe"), py::arg("stats"),
        py::arg("block_entries"), py::arg("score_scale") = py::none(), py::arg("score_shift") = py::none(),
        py::arg("key_mask") = py::none(), py::arg("key_mode") = kKeysNone, py::arg("key_param") = 1.0,
        py::arg("sink_scale") = 1.0, py::arg("boost_idx") = py::none(), py::arg("boost_n") = py::none(),
        py::arg("boost_gain") = py::none(), py::arg("boost_renormalize") = false, py::arg("record_threshold") = 0.0,
        py::arg("record_exclude_self") = false, py::arg("record_cap") = 0, py::arg("output") = true);
  m.def("parallel_threads", &parallel_threads, "Threads one parallel region of this extension runs on");
}
