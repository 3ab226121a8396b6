// CPU kernels for moyu's activation-sparse linear layers (fp32 and bf16, OpenMP).
//
// sparse_linear: y[b, :] = sum over k with |x[b, k]| > threshold[k] of x[b, k] * weight_t[k, :].
// One pass over x builds the list of active input channels (the union over the batch rows), so
// the weight rows of inactive channels are never read. The threads split either the N output
// columns (split_columns) or the active rows (split_rows, for small N). Each thread streams
// kRowsPerStep active rows at a time, accumulates in float32 and prefetches the rows it will
// read kPrefetchSteps steps later.
//
// masked_rows_linear: y[n] = dot(x, weight[n, :]) only where row_mask[n] is set (batch 1).
//
// The Python wrapper (kernels/cpu.py) validates shapes and dtypes before calling in here.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Rows streamed together per step. Several independent read streams per thread keep more cache
// misses in flight than one.
constexpr int kRowsPerStep = 4;

// Software prefetch distance, in steps of kRowsPerStep rows. The hardware prefetchers cannot
// predict the jump to the next active row, so the kernel prefetches it into L2 (prefetcht1),
// which measured faster in the cold regime than prefetching into L1.
constexpr int64_t kPrefetchSteps = 2;

// Float32 accumulator budget per thread, in floats (16 KiB, half of a 32 KiB L1 data cache).
constexpr int64_t kAccumulatorFloats = 4096;

// Column chunks shorter than this (bytes per row and thread) are streamed inefficiently, so the
// threads split the active rows instead when N is small. Measured with 2 threads: rows are faster
// for the 576-column fp32 and bf16 chunks (1152 and 576 bytes), columns for 1536 bytes and more.
constexpr int64_t kMinColumnChunkBytes = 1536;

// Below this many weight bytes to read, a single thread is faster than waking the others.
constexpr int64_t kMinBytesPerThread = 32 * 1024;

inline float load_float(const float* p) { return *p; }

inline float load_float(const uint16_t* p) {
  const uint32_t bits = static_cast<uint32_t>(*p) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline void store_value(float* p, float v) { *p = v; }

inline void store_value(uint16_t* p, float v) {
  const c10::BFloat16 rounded(v);  // round to nearest even, NaN stays NaN
  *p = rounded.x;
}

// Values per 64-byte cache line.
template <typename T>
constexpr int64_t line_elements() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

int64_t threads_for(int64_t bytes) {
  const int64_t available = std::max<int64_t>(1, at::get_num_threads());
  const int64_t useful = std::max<int64_t>(1, bytes / kMinBytesPerThread);
  return std::min(available, useful);
}

// Active-channel list of a [B, K] batch: channel indices where any row is above threshold, and
// the kept values (zero for rows below threshold) as float32, laid out [active][B].
template <typename T>
int64_t build_active_list(
    const T* x, const float* threshold, int64_t batch, int64_t K, bool round_threshold_to_bf16,
    std::vector<int32_t>& indices, std::vector<float>& values) {
  indices.resize(K);
  values.resize(K * batch);
  int64_t count = 0;
  for (int64_t k = 0; k < K; ++k) {
    float t = threshold[k];
    if (round_threshold_to_bf16) {
      // The reference compares against threshold.to(x.dtype), so a bf16 input is compared with
      // the bf16-rounded threshold.
      t = static_cast<float>(c10::BFloat16(t));
    }
    bool any = false;
    for (int64_t b = 0; b < batch; ++b) {
      const float v = load_float(x + b * K + k);
      const bool keep = std::fabs(v) > t;
      values[count * batch + b] = keep ? v : 0.0f;
      any = any || keep;
    }
    indices[count] = static_cast<int32_t>(k);
    count += any ? 1 : 0;
  }
  return count;
}

// Accumulate acc[b][j] (j in [0, len)) += sum over the active rows of value[b] * w[row][c0 + j].
template <int B, typename T>
void accumulate_tile(
    const T* weight_t, int64_t N, const int32_t* indices, const float* values, int64_t active,
    int64_t c0, int64_t len, float* acc) {
  constexpr int64_t V = line_elements<T>();
  constexpr int U = kRowsPerStep;
  std::fill(acc, acc + B * len, 0.0f);
  const int64_t full = len - len % V;

  int64_t g = 0;
  for (; g + U <= active; g += U) {
    const T* w[U];
    float a[U][B];
    for (int u = 0; u < U; ++u) {
      w[u] = weight_t + static_cast<int64_t>(indices[g + u]) * N + c0;
      for (int b = 0; b < B; ++b) a[u][b] = values[(g + u) * B + b];
    }
    const int64_t gp = g + kPrefetchSteps * U;
    const bool prefetch = gp + U <= active;
    const T* p[U];
    for (int u = 0; u < U; ++u) {
      p[u] = prefetch ? weight_t + static_cast<int64_t>(indices[gp + u]) * N + c0 : w[u];
    }

    for (int64_t j = 0; j < full; j += V) {
      if (prefetch) {
        for (int u = 0; u < U; ++u) __builtin_prefetch(p[u] + j, 0, 2);
      }
      for (int b = 0; b < B; ++b) {
        float* out = acc + b * len + j;
#pragma omp simd
        for (int64_t jj = 0; jj < V; ++jj) {
          out[jj] += a[0][b] * load_float(w[0] + j + jj) + a[1][b] * load_float(w[1] + j + jj) +
                     a[2][b] * load_float(w[2] + j + jj) + a[3][b] * load_float(w[3] + j + jj);
        }
      }
    }
    for (int64_t j = full; j < len; ++j) {
      for (int b = 0; b < B; ++b) {
        acc[b * len + j] += a[0][b] * load_float(w[0] + j) + a[1][b] * load_float(w[1] + j) +
                            a[2][b] * load_float(w[2] + j) + a[3][b] * load_float(w[3] + j);
      }
    }
  }

  for (; g < active; ++g) {
    const T* w0 = weight_t + static_cast<int64_t>(indices[g]) * N + c0;
    for (int b = 0; b < B; ++b) {
      const float a0 = values[g * B + b];
      float* out = acc + b * len;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) out[j] += a0 * load_float(w0 + j);
    }
  }
}

// Output columns [begin, end) of y: sum of the active rows, plus bias.
template <int B, typename T>
void store_tile(const float* acc, int64_t len, int64_t c0, int64_t N, const float* bias, T* y) {
  for (int b = 0; b < B; ++b) {
    for (int64_t j = 0; j < len; ++j) {
      const float v = acc[b * len + j] + (bias != nullptr ? bias[c0 + j] : 0.0f);
      store_value(y + b * N + c0 + j, v);
    }
  }
}

// Threads split the output columns into contiguous chunks of whole cache lines, and each thread
// reads every active row over its chunk.
template <int B, typename T>
void split_columns(
    const T* weight_t, int64_t N, const int32_t* indices, const float* values, int64_t active,
    const float* bias, T* y, int64_t nthreads) {
  constexpr int64_t V = line_elements<T>();
  const int64_t lines = (N + V - 1) / V;

#pragma omp parallel num_threads(nthreads)
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t team = omp_get_num_threads();
    const int64_t begin = std::min(N, (lines * tid / team) * V);
    const int64_t end = std::min(N, (lines * (tid + 1) / team) * V);
    const int64_t tile = std::max<int64_t>(V, (kAccumulatorFloats / B) / V * V);
    std::vector<float> acc(static_cast<size_t>(B * std::max<int64_t>(std::min(tile, end - begin), 1)));

    for (int64_t c0 = begin; c0 < end; c0 += tile) {
      const int64_t len = std::min(tile, end - c0);
      accumulate_tile<B, T>(weight_t, N, indices, values, active, c0, len, acc.data());
      store_tile<B, T>(acc.data(), len, c0, N, bias, y);
    }
  }
}

// Threads split the active rows, each reads whole rows into a private [B, N] partial sum, and
// after a barrier each thread adds up the partial sums over its share of the columns. Used when
// a column chunk would be too short for efficient streaming (small N, as in a down projection).
template <int B, typename T>
void split_rows(
    const T* weight_t, int64_t N, const int32_t* indices, const float* values, int64_t active,
    const float* bias, T* y, int64_t nthreads) {
  constexpr int64_t V = line_elements<T>();
  const int64_t lines = (N + V - 1) / V;
  std::vector<float> partial(static_cast<size_t>(nthreads * B * N));

#pragma omp parallel num_threads(nthreads)
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t team = omp_get_num_threads();
    // Split on whole steps of kRowsPerStep rows so that only the last thread has a remainder.
    const int64_t steps = (active + kRowsPerStep - 1) / kRowsPerStep;
    const int64_t r0 = std::min(active, steps * tid / team * kRowsPerStep);
    const int64_t r1 = std::min(active, steps * (tid + 1) / team * kRowsPerStep);
    float* mine = partial.data() + tid * B * N;
    accumulate_tile<B, T>(weight_t, N, indices + r0, values + r0 * B, r1 - r0, 0, N, mine);

#pragma omp barrier
    const int64_t begin = std::min(N, (lines * tid / team) * V);
    const int64_t end = std::min(N, (lines * (tid + 1) / team) * V);
    for (int b = 0; b < B; ++b) {
      for (int64_t j = begin; j < end; ++j) {
        float v = bias != nullptr ? bias[j] : 0.0f;
        for (int64_t t = 0; t < team; ++t) v += partial[(t * B + b) * N + j];
        store_value(y + b * N + j, v);
      }
    }
  }
}

template <int B, typename T>
void sparse_rows_times_weight(
    const T* weight_t, int64_t N, const int32_t* indices, const float* values, int64_t active,
    const float* bias, T* y) {
  const int64_t bytes = active * N * static_cast<int64_t>(sizeof(T));
  const int64_t nthreads = threads_for(bytes);
  const int64_t chunk_bytes = N * static_cast<int64_t>(sizeof(T)) / nthreads;
  if (nthreads > 1 && chunk_bytes < kMinColumnChunkBytes && B * N <= kAccumulatorFloats * 4) {
    split_rows<B, T>(weight_t, N, indices, values, active, bias, y, nthreads);
  } else {
    split_columns<B, T>(weight_t, N, indices, values, active, bias, y, nthreads);
  }
}

template <typename T>
void dispatch_batch(
    int64_t batch, const T* weight_t, int64_t N, const int32_t* indices, const float* values,
    int64_t active, const float* bias, T* y) {
  switch (batch) {
    case 1: return sparse_rows_times_weight<1, T>(weight_t, N, indices, values, active, bias, y);
    case 2: return sparse_rows_times_weight<2, T>(weight_t, N, indices, values, active, bias, y);
    case 3: return sparse_rows_times_weight<3, T>(weight_t, N, indices, values, active, bias, y);
    case 4: return sparse_rows_times_weight<4, T>(weight_t, N, indices, values, active, bias, y);
    case 5: return sparse_rows_times_weight<5, T>(weight_t, N, indices, values, active, bias, y);
    case 6: return sparse_rows_times_weight<6, T>(weight_t, N, indices, values, active, bias, y);
    case 7: return sparse_rows_times_weight<7, T>(weight_t, N, indices, values, active, bias, y);
    case 8: return sparse_rows_times_weight<8, T>(weight_t, N, indices, values, active, bias, y);
    default: TORCH_CHECK(false, "sparse kernel batch must be 1 to 8, got ", batch);
  }
}

// Zero the entries of x at or below threshold, written to a new tensor, for the dense path.
template <typename T>
void mask_below_threshold(const T* x, const float* threshold, int64_t rows, int64_t K, bool bf16, T* kept) {
  std::vector<float> t(threshold, threshold + K);
  if (bf16) {
    for (auto& v : t) v = static_cast<float>(c10::BFloat16(v));
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const T v = x[r * K + k];
        kept[r * K + k] = std::fabs(load_float(&v)) > t[k] ? v : T(0);
      }
    }
  });
}

torch::Tensor dense_kept_matmul(
    const torch::Tensor& x, const torch::Tensor& weight_t, const torch::Tensor& threshold,
    const c10::optional<torch::Tensor>& bias) {
  const int64_t rows = x.size(0);
  const int64_t K = x.size(1);
  auto kept = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat) {
    mask_below_threshold<float>(x.data_ptr<float>(), threshold.data_ptr<float>(), rows, K, false,
                                kept.data_ptr<float>());
  } else {
    mask_below_threshold<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                                   threshold.data_ptr<float>(), rows, K, true,
                                   reinterpret_cast<uint16_t*>(kept.data_ptr<at::BFloat16>()));
  }
  if (bias.has_value()) {
    return at::addmm(bias->to(x.scalar_type()), kept, weight_t);
  }
  return at::mm(kept, weight_t);
}

}  // namespace

// x: [rows, K] contiguous fp32 or bf16; weight_t: [K, N] contiguous, same dtype; threshold: [K]
// float32; bias: [N] float32 or None. More than max_sparse_rows rows use the dense matmul of the
// kept values. So does a batch of 2 or more rows whose active-channel union exceeds
// max_active_fraction * K.
torch::Tensor sparse_linear(
    const torch::Tensor& x, const torch::Tensor& weight_t, const torch::Tensor& threshold,
    const c10::optional<torch::Tensor>& bias, int64_t max_sparse_rows, double max_active_fraction) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [rows, K] tensor");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous(), "weight_t must be a contiguous [K, N] tensor");
  TORCH_CHECK(x.scalar_type() == weight_t.scalar_type(), "x and weight_t must have the same dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(threshold.scalar_type() == torch::kFloat && threshold.is_contiguous(),
              "threshold must be a contiguous float32 tensor");
  const int64_t rows = x.size(0);
  const int64_t K = x.size(1);
  const int64_t N = weight_t.size(1);
  TORCH_CHECK(weight_t.size(0) == K && threshold.numel() == K, "x, weight_t and threshold disagree on K");
  TORCH_CHECK(K < INT32_MAX, "K must fit in int32, got ", K);
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->is_contiguous() && bias->numel() == N,
                "bias must be a contiguous float32 [N] tensor");
    bias_ptr = bias->data_ptr<float>();
  }

  if (rows > max_sparse_rows || rows > 8) {
    return dense_kept_matmul(x, weight_t, threshold, bias);
  }

  thread_local std::vector<int32_t> indices;
  thread_local std::vector<float> values;
  auto y = torch::empty({rows, N}, x.options());
  const float* t = threshold.data_ptr<float>();

  if (x.scalar_type() == torch::kFloat) {
    const int64_t active = build_active_list<float>(x.data_ptr<float>(), t, rows, K, false, indices, values);
    if (rows > 1 && active > max_active_fraction * K) {
      return dense_kept_matmul(x, weight_t, threshold, bias);
    }
    dispatch_batch<float>(rows, weight_t.data_ptr<float>(), N, indices.data(), values.data(), active,
                          bias_ptr, y.data_ptr<float>());
  } else {
    const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const int64_t active = build_active_list<uint16_t>(xb, t, rows, K, true, indices, values);
    if (rows > 1 && active > max_active_fraction * K) {
      return dense_kept_matmul(x, weight_t, threshold, bias);
    }
    dispatch_batch<uint16_t>(rows, reinterpret_cast<const uint16_t*>(weight_t.data_ptr<at::BFloat16>()), N,
                             indices.data(), values.data(), active, bias_ptr,
                             reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

namespace {

// y[n] = dot(x, weight[n, :]) for each n in rows; x is already float32.
template <typename T>
void dot_rows(const float* x, const T* weight, int64_t K, const int32_t* rows, int64_t count, T* y) {
  constexpr int64_t V = 16;
  const int64_t bytes = count * K * static_cast<int64_t>(sizeof(T));
  const int64_t nthreads = std::min<int64_t>(threads_for(bytes), std::max<int64_t>(count, 1));
  const int64_t full = K - K % V;

#pragma omp parallel num_threads(nthreads)
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t team = omp_get_num_threads();
    const int64_t begin = count * tid / team;
    const int64_t end = count * (tid + 1) / team;
    int64_t i = begin;
    for (; i + kRowsPerStep <= end; i += kRowsPerStep) {
      const T* w0 = weight + static_cast<int64_t>(rows[i]) * K;
      const T* w1 = weight + static_cast<int64_t>(rows[i + 1]) * K;
      const T* w2 = weight + static_cast<int64_t>(rows[i + 2]) * K;
      const T* w3 = weight + static_cast<int64_t>(rows[i + 3]) * K;
      const int64_t ip = i + kPrefetchSteps * kRowsPerStep;
      const bool prefetch = ip + kRowsPerStep <= end;
      float s0[V] = {}, s1[V] = {}, s2[V] = {}, s3[V] = {};
      for (int64_t j = 0; j < full; j += V) {
        if (prefetch) {
          for (int u = 0; u < kRowsPerStep; ++u) {
            __builtin_prefetch(weight + static_cast<int64_t>(rows[ip + u]) * K + j, 0, 3);
          }
        }
#pragma omp simd
        for (int64_t jj = 0; jj < V; ++jj) {
          const float xv = x[j + jj];
          s0[jj] += xv * load_float(w0 + j + jj);
          s1[jj] += xv * load_float(w1 + j + jj);
          s2[jj] += xv * load_float(w2 + j + jj);
          s3[jj] += xv * load_float(w3 + j + jj);
        }
      }
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
      for (int64_t jj = 0; jj < V; ++jj) {
        d0 += s0[jj];
        d1 += s1[jj];
        d2 += s2[jj];
        d3 += s3[jj];
      }
      for (int64_t j = full; j < K; ++j) {
        d0 += x[j] * load_float(w0 + j);
        d1 += x[j] * load_float(w1 + j);
        d2 += x[j] * load_float(w2 + j);
        d3 += x[j] * load_float(w3 + j);
      }
      store_value(y + rows[i], d0);
      store_value(y + rows[i + 1], d1);
      store_value(y + rows[i + 2], d2);
      store_value(y + rows[i + 3], d3);
    }
    for (; i < end; ++i) {
      const T* w0 = weight + static_cast<int64_t>(rows[i]) * K;
      float d0 = 0.0f;
#pragma omp simd reduction(+ : d0)
      for (int64_t j = 0; j < K; ++j) d0 += x[j] * load_float(w0 + j);
      store_value(y + rows[i], d0);
    }
  }
}

}  // namespace

// x: [K] contiguous; weight: [N, K] contiguous, same dtype; row_mask: [N] bool. Batch 1 only.
torch::Tensor masked_rows_linear_single(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& row_mask) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "x must be a contiguous [K] tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [N, K] tensor");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have the same dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(row_mask.scalar_type() == torch::kBool && row_mask.is_contiguous(), "row_mask must be a contiguous bool tensor");
  const int64_t N = weight.size(0);
  const int64_t K = weight.size(1);
  TORCH_CHECK(x.numel() == K && row_mask.numel() == N, "x, weight and row_mask disagree on N or K");
  TORCH_CHECK(N < INT32_MAX, "N must fit in int32, got ", N);

  const bool* mask = row_mask.data_ptr<bool>();
  std::vector<int32_t> rows;
  rows.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    if (mask[n]) rows.push_back(static_cast<int32_t>(n));
  }
  auto y = torch::zeros({N}, x.options());
  const auto xf = x.to(torch::kFloat).contiguous();
  if (x.scalar_type() == torch::kFloat) {
    dot_rows<float>(xf.data_ptr<float>(), weight.data_ptr<float>(), K, rows.data(),
                    static_cast<int64_t>(rows.size()), y.data_ptr<float>());
  } else {
    dot_rows<uint16_t>(xf.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), K,
                       rows.data(), static_cast<int64_t>(rows.size()),
                       reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_linear", &sparse_linear, "Thresholded sparse x @ weight_t (see kernels/cpu.py)");
  m.def("masked_rows_linear_single", &masked_rows_linear_single,
        "Batch-1 x @ weight.T computed only for the rows selected by row_mask");
}
