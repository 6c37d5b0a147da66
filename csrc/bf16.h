// bfloat16 tile products for the CPU kernels (tiling.h): bf16 operands, float32 results.
//
// Built in when the compiler targets a CPU with 16-bit dot products (-march=native defines
// __AVX512BF16__ on AVX512-BF16 / AMX machines: Zen 4 and later, Cooper Lake, Sapphire Rapids
// and later); without them the kernels widen bf16 rows to float32 as they do float16
// (FASTCL_BF16_PRODUCTS 0). The products are ATen's exported batch-reduce GEMM
// (at::native::cpublas::brgemm) in its plain layout (is_vnni = false: A and B row-major), which
// runs oneDNN's bf16 x bf16 -> f32 GEMM, single-threaded inside the kernels' parallel regions.
//
// Conversions float -> bf16 round to nearest even (vcvtneps2bf16, which also flushes float32
// subnormals to zero: weights below 1e-38 are zero either way).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    (defined(__x86_64__) || defined(_M_X64))
#define FASTCL_BF16_PRODUCTS 1
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#else
#define FASTCL_BF16_PRODUCTS 0
#endif

namespace fastcl {
namespace bf16 {

// Whether this build multiplies bf16 rows as bf16, and a process-wide switch (on by default;
// tests and A/B benchmarks turn it off to run the widening path on the same build).
inline std::atomic<bool>& switch_on() {
  static std::atomic<bool> on{true};
  return on;
}

inline bool available() { return FASTCL_BF16_PRODUCTS != 0; }

inline bool enabled() { return available() && switch_on().load(std::memory_order_relaxed); }

// dst (cols x rows, leading dimension ld_dst) = src^T, src (rows x cols, leading dimension
// ld_src): 16-bit elements, in square blocks so that both sides stay in cache lines.
inline void transpose16(const uint16_t* src, int64_t rows, int64_t cols, int64_t ld_src,
                        uint16_t* dst, int64_t ld_dst) {
  constexpr int64_t kB = 32;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = std::min(cols, c0 + kB);
      for (int64_t c = c0; c < c1; ++c) {
        uint16_t* out = dst + c * ld_dst;
        for (int64_t r = r0; r < r1; ++r) out[r] = src[r * ld_src + c];
      }
    }
  }
}

// The transpose of a contiguous (n x d) bf16 matrix, as a new contiguous (d x n) tensor; row
// bands in parallel.
inline at::Tensor transposed(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1);
  auto out = at::empty({d, n}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, (n + 255) / 256, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * 256, rows = std::min<int64_t>(256, n - r0);
      transpose16(src + r0 * d, rows, d, d, dst + r0, n);
    }
  });
  return out;
}

// Row norms of a bf16 matrix (n x d) in float32, clamped at eps as F.normalize clamps them:
// each element widened in registers (a bf16 is the high half of a float32), no float32 copy of
// the rows (torch.linalg.vector_norm(x, dtype=float32) makes one: 32 MiB for a 65536 x 128
// queue, most of the norms' time).
inline at::Tensor row_norms(const at::Tensor& x_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2 && x_in.device().is_cpu(),
              "fastcl_cpu: row_norms takes a 2-D bfloat16 CPU tensor");
  const auto x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  auto out = at::empty({n}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(eps);
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint16_t* xr = xp + r * d;
      float ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t k = 0; k < d; ++k) {
        const uint32_t bits = static_cast<uint32_t>(xr[k]) << 16;
        float v;
        std::memcpy(&v, &bits, sizeof v);
        ss += v * v;
      }
      const float len = std::sqrt(ss);
      op[r] = len < lo ? lo : len;  // NaN stays NaN
    }
  });
  return out;
}

#if FASTCL_BF16_PRODUCTS

// dst (cols x rows, leading dimension ldd) = src^T, src (rows x cols, leading dimension lds):
// float32, 8 x 8 blocks in AVX registers (unpack, shuffle, lane permute), the edges one by one.
// About 8x the scalar 16-bit transpose16 on a 128 x 128 tile.
inline void transpose32(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                        int64_t ldd) {
  const int64_t r8 = rows / 8 * 8, c8 = cols / 8 * 8;
  for (int64_t r0 = 0; r0 < r8; r0 += 8) {
    for (int64_t c0 = 0; c0 < c8; c0 += 8) {
      const float* s = src + r0 * lds + c0;
      const __m256 r0v = _mm256_loadu_ps(s), r1v = _mm256_loadu_ps(s + lds),
                   r2v = _mm256_loadu_ps(s + 2 * lds), r3v = _mm256_loadu_ps(s + 3 * lds),
                   r4v = _mm256_loadu_ps(s + 4 * lds), r5v = _mm256_loadu_ps(s + 5 * lds),
                   r6v = _mm256_loadu_ps(s + 6 * lds), r7v = _mm256_loadu_ps(s + 7 * lds);
      const __m256 t0 = _mm256_unpacklo_ps(r0v, r1v), t1 = _mm256_unpackhi_ps(r0v, r1v),
                   t2 = _mm256_unpacklo_ps(r2v, r3v), t3 = _mm256_unpackhi_ps(r2v, r3v),
                   t4 = _mm256_unpacklo_ps(r4v, r5v), t5 = _mm256_unpackhi_ps(r4v, r5v),
                   t6 = _mm256_unpacklo_ps(r6v, r7v), t7 = _mm256_unpackhi_ps(r6v, r7v);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                   u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                   u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                   u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
                   u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)),
                   u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
                   u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)),
                   u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* d = dst + c0 * ldd + r0;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t c = c8; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
  for (int64_t r = r8; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Per-thread float32 scratch of at least len elements (a tile's weights, transposed).
inline float* float_scratch(int64_t len) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < len) buf.resize(len);
  return buf.data();
}

// x[k] * f[k] (f null: x[k]) as hi[k] + lo[k], both bf16: hi the nearest bf16, lo the nearest
// to the rest (x f - hi is exact in float32): 16 significant bits, relative error below 2^-16,
// where hi alone has 2^-9. k < len.
inline void split_to_bf16(const float* x, const float* f, int64_t len, at::BFloat16* hi,
                          at::BFloat16* lo) {
  int64_t k = 0;
  auto one = [&](__mmask16 mask, int64_t at) {
    const __m512 xv = _mm512_maskz_loadu_ps(mask, x + at);
    const __m512 v = f ? _mm512_mul_ps(xv, _mm512_maskz_loadu_ps(mask, f + at)) : xv;
    const __m256bh h = _mm512_cvtneps_pbh(v);
    // bf16 -> float32: the 16 bits shifted into the high half
    const __m512 hf = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
    const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
    _mm256_mask_storeu_epi16(hi + at, mask, (__m256i)h);
    _mm256_mask_storeu_epi16(lo + at, mask, (__m256i)l);
  };
  for (; k + 16 <= len; k += 16) one(static_cast<__mmask16>(0xFFFF), k);
  if (k < len) one(static_cast<__mmask16>((1u << (len - k)) - 1), k);
}

inline void release_tiles();

// c (m x n, leading dimension ldc) = a (m x k, row-major, lda) @ b (k x n, row-major, ldb),
// bf16 operands, float32 products and sums; accumulated into c when add.
inline void gemm(int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
                 const at::BFloat16* b, int64_t ldb, float* c, int64_t ldc, bool add) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!add)
      for (int64_t r = 0; r < m; ++r) std::fill(c + r * ldc, c + r * ldc + n, 0.0f);
    return;
  }
  release_tiles();  // oneDNN's GEMM may run AMX kernels of its own
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
}

// AMX: where oneDNN can run its AMX-BF16 kernels in this process (Sapphire Rapids and later:
// could_pack), the products take B in the VNNI layout (pairs of K interleaved, full width, so
// that a tile's columns start anywhere: ldb is the whole matrix's width), M in chunks of 128 and
// N in chunks of 64 (measured fastest on a 2-core Sapphire Rapids VM: one call with N = 512 was
// half as fast). About 3x the plain path's rate there (128 x 128 x 128: 5 us against 16 us on
// one core). Elsewhere (Zen 4, Cooper Lake: AVX512-BF16 without AMX) the plain layout.
inline std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{true};
  return on;
}

inline bool amx_available() {
  static const bool on = at::native::cpublas::could_pack(at::kBFloat16);
  return on;
}

// Switched off (tests, A/B runs), the plain layout runs, as on a CPU without AMX.
inline bool amx() { return amx_available() && amx_switch().load(std::memory_order_relaxed); }

// The AMX tile configuration a thread holds is ATen's brgemm cache's to know about: other oneDNN
// kernels on the thread (a plain bf16 GEMM, torch's own matmuls between fastcl's calls) may
// reconfigure the tiles behind it. Released before those and at the end of every parallel
// chunk of the kernels' loops (TileRelease), so that the next AMX product configures afresh.
inline void release_tiles() {
  if (amx()) at::native::cpublas::brgemm_release(true);
}

struct TileRelease {
  explicit TileRelease(bool on) : on(on) {}
  ~TileRelease() {
    if (on) release_tiles();
  }
  bool on;
};

// x (n x d, contiguous, d even) as the right side of a logits product in the VNNI layout:
// x^T (K = d, N = n) stored [d / 2][n][2], a transpose of 32-bit pairs.
inline at::Tensor vnni_transposed(const at::Tensor& x) {
  const int64_t n = x.size(0), h = x.size(1) / 2;
  auto out = at::empty({h, n, 2}, x.options());
  const auto* src = reinterpret_cast<const uint32_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, (n + 255) / 256, 1, [&](int64_t b0, int64_t b1) {
    constexpr int64_t kB = 16;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * 256, r1 = std::min<int64_t>(n, r0 + 256);
      for (int64_t k0 = 0; k0 < h; k0 += kB)
        for (int64_t j0 = r0; j0 < r1; j0 += kB)
          for (int64_t k = k0; k < std::min(h, k0 + kB); ++k)
            for (int64_t j = j0; j < std::min(r1, j0 + kB); ++j) dst[k * n + j] = src[j * h + k];
    }
  });
  return out;
}

// x (n x d, contiguous) as the right side of a gradient product (K = n, N = d) in the VNNI
// layout: rows 2p and 2p + 1 interleaved, [ceil(n / 2)][d][2], a zero row after an odd n.
inline at::Tensor vnni_rows(const at::Tensor& x) {
  const int64_t n = x.size(0), d = x.size(1), pairs = (n + 1) / 2;
  auto out = at::empty({pairs, d, 2}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, pairs, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* r0 = src + 2 * p * d;
      const bool has1 = 2 * p + 1 < n;
      uint16_t* o = dst + p * d * 2;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        o[2 * c] = r0[c];
        o[2 * c + 1] = has1 ? r0[d + c] : uint16_t(0);
      }
    }
  });
  return out;
}

// gemm with b in the VNNI layout (b points at pair-row 0 of the first column, ldb the layout's
// full width in columns), k even.
inline void gemm_vnni(int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
                      const at::BFloat16* b, int64_t ldb, float* c, int64_t ldc, bool add) {
  for (int64_t i = 0; i < m; i += 128)
    for (int64_t p = 0; p < n; p += 64)
      at::native::cpublas::brgemm(std::min<int64_t>(128, m - i), std::min<int64_t>(64, n - p),
                                  k, lda, ldb, ldc, add, a + i * lda, b + p * 2, c + i * ldc + p,
                                  /*is_vnni=*/true);
}

// Per-thread bf16 scratch of at least len elements (a tile's weights before their product).
inline at::BFloat16* scratch(int64_t len, int slot = 0) {
  thread_local std::vector<at::BFloat16> bufs[2];
  auto& buf = bufs[slot];
  if (static_cast<int64_t>(buf.size()) < len) buf.resize(len);
  return buf.data();
}

#endif  // FASTCL_BF16_PRODUCTS

#if !FASTCL_BF16_PRODUCTS
inline std::atomic<bool>& amx_switch() {
  static std::atomic<bool> on{true};
  return on;
}
inline bool amx() { return false; }
inline void release_tiles() {}
struct TileRelease {
  explicit TileRelease(bool) {}
};
#endif

}  // namespace bf16
}  // namespace fastcl
