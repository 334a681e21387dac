// Quantized layers on MLX's CPU backend: a matrix-vector product for decoding (x, 1 to 8 rows, @ W.T)
// and a dequantize for prefill, W affine-quantized in 4 or 8 bits. duomem_mlx/cpu/kernel.py builds
// it as an MLX extension on Linux.
//
// MLX's own CPU kernels are scalar loops on one thread: its quantized product reads ~1.5 G weights/s
// on an x86 core, 14x slower than OpenBLAS's sgemv reads the same layer in float32 (a 4-bit model
// decoded 3x slower than float32), and its dequantize ~1.2 G/s (a 50-token agent step spent ~150 ms
// dequantizing SmolLM2). Here eight weights are unpacked at a time (AVX2), the product summed per
// group as scale * (q . x) + bias * sum(x) (the sum of dequantizing first, in another order), and the
// output rows of a layer of 4 M weights or more (a head) split across threads (OpenMP).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx::core;

namespace {

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DUOMEM_SIMD 1
// Eight weights as floats: for 4 bits, one word broadcast and shifted per lane; for 8 bits, two words widened.
using vec = __m256;
constexpr int LANES = 8;
template <int bits>
inline vec unpack(const uint32_t* w) {
  if constexpr (bits == 4) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(*w)), shifts);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  }
}
inline vec load(const float* x) { return _mm256_loadu_ps(x); }
inline void store(float* out, vec v) { _mm256_storeu_ps(out, v); }
inline vec zero() { return _mm256_setzero_ps(); }
inline vec splat(float v) { return _mm256_set1_ps(v); }
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float sum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

// Layers this large split their output rows across threads (OpenMP). Smaller ones stay on MLX's
// stream thread: a parallel region ends at a barrier that waits for every thread, and when another
// process holds a core (llama.cpp's spinning threads beside ours) 210 barriers a token cost a
// SmolLM2 4-bit agent step 822 ms against 214 on one thread. A head is one region a token.
#ifndef THREADED_WEIGHTS
#define THREADED_WEIGHTS (1 << 22)
#endif

// Weight i of a packed row as a float (the plain C++ paths).
template <int bits>
inline float weight_at(const uint32_t* w, int i) {
  return static_cast<float>((w[i * bits / 32] >> (bits * (i % (32 / bits)))) & ((1u << bits) - 1));
}

#ifdef DUOMEM_SIMD
// One output row: sum over groups of scale * (q . x) + bias * sum(x), for `rows` rows of x at once.
// `chains` independent accumulators a row hide the FMA's latency (4 cycles) when rows are few.
template <int bits, int rows>
void output_row(const float* x, const uint32_t* w, const float* scales, const float* biases, const float* x_sums,
                float* out, int n_out, int k, int group_size) {
  constexpr int chains = rows >= 4 ? 1 : (rows >= 2 ? 2 : 4);
  const int groups = k / group_size;
  vec total[rows];
  float bias_total[rows];
  for (int m = 0; m < rows; ++m) total[m] = zero(), bias_total[m] = 0.0f;
  for (int g = 0; g < groups; ++g) {
    vec acc[rows][chains];
    for (int m = 0; m < rows; ++m)
      for (int c = 0; c < chains; ++c) acc[m][c] = zero();
    const uint32_t* wg = w + g * group_size * bits / 32;
    const float* xg = x + g * group_size;
    for (int i = 0; i < group_size; i += LANES * chains) {
      for (int c = 0; c < chains; ++c) {
        vec q = unpack<bits>(wg + (i + c * LANES) * bits / 32);
        for (int m = 0; m < rows; ++m) acc[m][c] = fma(q, load(xg + m * k + i + c * LANES), acc[m][c]);
      }
    }
    for (int m = 0; m < rows; ++m) {
      for (int c = 1; c < chains; ++c) acc[m][0] = add(acc[m][0], acc[m][c]);
      total[m] = fma(acc[m][0], splat(scales[g]), total[m]);
      bias_total[m] += biases[g] * x_sums[m * groups + g];
    }
  }
  for (int m = 0; m < rows; ++m) out[static_cast<size_t>(m) * n_out] = sum(total[m]) + bias_total[m];
}
#else
template <int bits, int rows>
void output_row(const float* x, const uint32_t* w, const float* scales, const float* biases, const float* x_sums,
                float* out, int n_out, int k, int group_size) {
  const int groups = k / group_size;
  for (int m = 0; m < rows; ++m) {
    float total = 0.0f;
    for (int g = 0; g < groups; ++g) {
      float acc = 0.0f;
      for (int i = 0; i < group_size; ++i) {
        int index = g * group_size + i;
        acc += weight_at<bits>(w, index) * x[m * k + index];
      }
      total += scales[g] * acc + biases[g] * x_sums[m * groups + g];
    }
    out[static_cast<size_t>(m) * n_out] = total;
  }
}
#endif

template <int bits, int rows>
void matvec(const float* x, const uint32_t* w, const float* scales, const float* biases, float* out, int n_out, int k,
            int group_size) {
  const int groups = k / group_size;
  const size_t words_per_row = static_cast<size_t>(k) * bits / 32;
  std::vector<float> x_sums(rows * groups);
  for (int m = 0; m < rows; ++m) {
    for (int g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int i = 0; i < group_size; ++i) s += x[m * k + g * group_size + i];
      x_sums[m * groups + g] = s;
    }
  }
#pragma omp parallel for schedule(static) if (static_cast<size_t>(n_out) * k >= THREADED_WEIGHTS)
  for (int n = 0; n < n_out; ++n) {
    output_row<bits, rows>(x, w + n * words_per_row, scales + static_cast<size_t>(n) * groups,
                           biases + static_cast<size_t>(n) * groups, x_sums.data(), out + n, n_out, k, group_size);
  }
}

// W as float32: scale * q + bias, weight by weight, the output rows split across threads.
template <int bits>
void dequantize_rows(const uint32_t* w, const float* scales, const float* biases, float* out, int n_out, int k,
                     int group_size) {
  const int groups = k / group_size;
  const size_t words_per_row = static_cast<size_t>(k) * bits / 32;
#pragma omp parallel for schedule(static) if (static_cast<size_t>(n_out) * k >= THREADED_WEIGHTS)
  for (int n = 0; n < n_out; ++n) {
    const uint32_t* w_row = w + n * words_per_row;
    float* out_row = out + static_cast<size_t>(n) * k;
    for (int g = 0; g < groups; ++g) {
      float scale = scales[static_cast<size_t>(n) * groups + g], bias = biases[static_cast<size_t>(n) * groups + g];
#ifdef DUOMEM_SIMD
      for (int i = g * group_size; i < (g + 1) * group_size; i += LANES) {
        store(out_row + i, fma(unpack<bits>(w_row + i * bits / 32), splat(scale), splat(bias)));
      }
#else
      for (int i = g * group_size; i < (g + 1) * group_size; ++i) {
        out_row[i] = scale * weight_at<bits>(w_row, i) + bias;
      }
#endif
    }
  }
}

using Kernel = void (*)(const float*, const uint32_t*, const float*, const float*, float*, int, int, int);

// The kernels for 1 to MAX_ROWS rows, each compiled with its row count fixed (accumulators in registers).
template <int bits, int... rows>
Kernel pick(int n_rows, std::integer_sequence<int, rows...>) {
  Kernel kernel = nullptr;
  ((n_rows == rows + 1 ? (kernel = matvec<bits, rows + 1>, 0) : 0), ...);
  return kernel;
}

constexpr int MAX_ROWS = 8;

Kernel kernel_for(int bits, int rows) {
  auto sizes = std::make_integer_sequence<int, MAX_ROWS>{};
  return bits == 4 ? pick<4>(rows, sizes) : pick<8>(rows, sizes);
}

// Both operations as one primitive: `dequantize_` says which (inputs x, w, scales, biases, or w, scales, biases).
class QuantizedCpu : public UnaryPrimitive {
 public:
  QuantizedCpu(Stream stream, int group_size, int bits, bool dequantize)
      : UnaryPrimitive(stream), group_size_(group_size), bits_(bits), dequantize_(dequantize) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    auto& encoder = cpu::get_command_encoder(stream());
    for (auto& a : inputs) encoder.set_input_array(a);
    out.set_data(allocator::malloc(out.nbytes()));
    encoder.set_output_array(out);
    std::vector<array> in;
    for (auto& a : inputs) in.push_back(array::unsafe_weak_copy(a));
    encoder.dispatch([in = std::move(in), out = array::unsafe_weak_copy(out), gs = group_size_, bits = bits_,
                      dequantize = dequantize_]() mutable {
      const array& w = in[dequantize ? 0 : 1];
      const float* scales = in[dequantize ? 1 : 2].data<float>();
      const float* biases = in[dequantize ? 2 : 3].data<float>();
      int n_out = w.shape(0), k = w.shape(1) * 32 / bits;
      if (dequantize) {
        (bits == 4 ? dequantize_rows<4> : dequantize_rows<8>)(w.data<uint32_t>(), scales, biases, out.data<float>(),
                                                              n_out, k, gs);
      } else {
        kernel_for(bits, in[0].size() / k)(in[0].data<float>(), w.data<uint32_t>(), scales, biases,
                                           out.data<float>(), n_out, k, gs);
      }
    });
  }

  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[duomem_mlx cpu_kernel] CPU only: use MLX's quantized ops on a GPU.");
  }

  // The gradients MLX's own ops give (calibration trains scales and biases through a dequantize).
  std::vector<array> vjp(const std::vector<array>& primals, const std::vector<array>& cotangents,
                         const std::vector<int>& argnums, const std::vector<array>&) override {
    std::vector<array> wrt;
    for (int i : argnums) wrt.push_back(primals[i]);
    auto reference = [&](const std::vector<array>& values) {
      auto in = primals;
      for (size_t j = 0; j < argnums.size(); ++j) in[argnums[j]] = values[j];
      if (dequantize_) {
        return std::vector<array>{
            mlx::core::dequantize(in[0], in[1], in[2], group_size_, bits_, "affine", std::nullopt, float32, stream())};
      }
      return std::vector<array>{quantized_matmul(in[0], in[1], in[2], in[3], true, group_size_, bits_, "affine", stream())};
    };
    return mlx::core::vjp(reference, wrt, cotangents).second;
  }

  const char* name() const override { return dequantize_ ? "DuomemDequantize" : "DuomemQuantizedMatvec"; }

  bool is_equivalent(const Primitive& other) const override {
    auto& o = static_cast<const QuantizedCpu&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_ && dequantize_ == o.dequantize_;
  }

 private:
  int group_size_;
  int bits_;
  bool dequantize_;
};

void check_weights(const array& w, const array& scales, const array& biases, int group_size, int bits) {
  // Every value the kernels divide by or index with is checked here, before an array is made: an
  // empty W or a group size of 0 would be a division by zero (SIGFPE), not an exception.
  if ((bits != 4 && bits != 8) || group_size <= 0 || group_size % 32 != 0 || w.dtype() != uint32 ||
      scales.dtype() != float32 || biases.dtype() != float32 || w.ndim() != 2 || w.shape(0) == 0 || w.shape(1) == 0 ||
      biases.shape() != scales.shape() || scales.ndim() != 2 || scales.shape(0) != w.shape(0) ||
      scales.shape(1) * group_size != w.shape(1) * 32 / bits) {
    throw std::invalid_argument(
        "[duomem_mlx cpu_kernel] a non-empty uint32 w with float32 scales and biases of its shape, 4 or 8 bits, groups "
        "of 32, 64 or 128");
  }
}

std::vector<array> contiguous_all(std::initializer_list<array> arrays, Stream stream) {
  std::vector<array> out;
  for (auto& a : arrays) out.push_back(contiguous(a, false, stream));
  return out;
}

array quantized_matvec(const array& x, const array& w, const array& scales, const array& biases, int group_size,
                       int bits, StreamOrDevice s) {
  check_weights(w, scales, biases, group_size, bits);
  if (x.dtype() != float32 || x.ndim() == 0 || x.shape(-1) != w.shape(1) * 32 / bits || x.size() == 0 ||
      x.size() / x.shape(-1) > MAX_ROWS) {
    throw std::invalid_argument("[duomem_mlx cpu_kernel] quantized_matvec takes 1 to 8 rows of float32 x as wide as W");
  }
  auto shape = x.shape();
  shape.back() = w.shape(0);
  auto stream = to_stream(s);
  return array(shape, float32, std::make_shared<QuantizedCpu>(stream, group_size, bits, false),
               contiguous_all({x, w, scales, biases}, stream));
}

array dequantize_weights(const array& w, const array& scales, const array& biases, int group_size, int bits, StreamOrDevice s) {
  check_weights(w, scales, biases, group_size, bits);
  auto stream = to_stream(s);
  return array({w.shape(0), w.shape(1) * 32 / bits}, float32,
               std::make_shared<QuantizedCpu>(stream, group_size, bits, true), contiguous_all({w, scales, biases}, stream));
}

}  // namespace

NB_MODULE(_quantized_matvec, m) {
  m.def("quantized_matvec", &quantized_matvec, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a,
        nb::kw_only(), "stream"_a = nb::none(),
        "x @ dequantize(w, scales, biases).T on a CPU stream, for 1 to 8 rows of float32 x (affine, 4 or 8 bits).");
  m.def("dequantize", &dequantize_weights, "w"_a, "scales"_a, "biases"_a, "group_size"_a, "bits"_a, nb::kw_only(),
        "stream"_a = nb::none(), "mx.dequantize's float32 values on a CPU stream, on every core (affine, 4 or 8 bits).");
}
