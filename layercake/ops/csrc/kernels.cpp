// layercake's CPU kernels (AVX2 + FMA + F16C), built on first use by layercake/ops/kernels.py.
//
// Every op checks its arguments with TORCH_CHECK (a RuntimeError naming the op and what is
// wrong) before touching memory. Weights may start at any byte address (a view into a mapped
// file or a staging buffer): their 16-bit fields are read with memcpy or unaligned vector loads,
// never through a cast to ``uint16_t*``.
//
// block_mm: matmul on group-32 quantized weights held as GGUF-style blocks.
//
// A weight (N, K) is N rows of G = K / 32 blocks; a block has a fp16 scale d, a fp16 offset m
// and 32 values q, w = d * q + m. A row holds its G scales, then its G offsets, then its values
// (the fields of GGUF's blocks, regrouped so that a row's fields load 8 at a time):
//   4 bits (20 bytes a block, GGUF Q4_1's fields): 16 bytes of values a block; byte j holds
//     value j (low nibble) and value j + 16 (high nibble), q in 0..15.
//   8 bits (36 bytes a block): 32 int8 values a block, q in -128..127 (GGUF Q8_0 is m = 0).
// The activations are quantized per block of 32 to int8 (x ~ dx * xq, llama.cpp's Q8 form for
// its dot products), and sx = dx * sum(xq) is kept for the offsets:
//   y[n] = sum_blocks  d * dx * dot(q, xq)  +  m * sx
// which is exactly the dequantized weight times the quantized activations. (The exact sum of x
// for sx looks more precise but is not: the offsets then no longer cancel the error of the
// all-positive 4-bit values, and the result's error doubles.)
//
// Every output (r, n) is computed by the same chain of float operations, whatever the number of
// rows, the instruction set or the threads: for each block g in order, its exact int32 dot
// product s, then acc = fma(float(s), d * dx, acc) (the product d * dx rounded first) and
// off = fma(m, sx, off), both from 0; y = acc + off. So a row gives the same bits alone or among
// others (a server's streams do not change each other's tokens), and every path gives the same
// bits. The lanes of a vector are outputs: a panel of 16 weight rows (AVX-512 VNNI) or 8 (AVX2)
// is transposed by 32-bit words as it is read, so that one integer multiply-add (vpdpbusd, or
// maddubs + madd) takes 4 values of each of the panel's rows against 4 values of one row of
// activations, broadcast; each block's weights are unpacked once for all the rows of a pass (up
// to 8, or 4 on AVX2). The integer dot needs no horizontal sums and its float work is three
// instructions a block for the whole panel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t QK = 32;

// Runs fn(0, next) .. fn(n - 1, next) on PyTorch's threads, each thread taking the next task as it
// finishes one (not a fixed half each): a core interrupted by disk I/O or another thread then
// does fewer tasks instead of the other waiting for it at the end (with fixed halves a streamed
// decode step spent a measurable share waiting so; the README has the figure). ``next`` is the
// task the same thread runs after this one (-1: none), claimed ahead so that its memory can be
// prefetched. With one thread (or inside a parallel region) the tasks run in order here.
template <class F>
void parallel_tasks(int64_t n, const F& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n; ++c) fn(c, c + 1 < n ? c + 1 : -1);
    return;
  }
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t c = counter.fetch_add(1, std::memory_order_relaxed);
    while (c < n) {
      const int64_t next = counter.fetch_add(1, std::memory_order_relaxed);
      fn(c, next < n ? next : -1);
      c = next;
    }
  });
}

// A 16-bit field at any byte address (memcpy: no alignment assumed; one load once compiled).
inline uint16_t u16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

inline float half_at(const uint8_t* p) { return _cvtsh_ss(u16_at(p)); }

// Eight 16-bit fields from p, at any byte address.
inline __m128i u16x8_at(const uint8_t* p) { return _mm_loadu_si128((const __m128i*)p); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x (M, K) -> xq (M, K) int8 in order, dx and sx (M, K / 32); as llama.cpp's quantize_row_q8_1
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* dx, float* sx) {
  const int64_t G = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < M * G; ++i) {
    const float* v = x + i * QK;
    __m256 a[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_loadu_ps(v + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, a[j]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(amax, 1), _mm256_castps256_ps128(amax));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.f;
    const __m256 id = _mm256_set1_ps(d > 0.f ? 127.f / _mm_cvtss_f32(m4) : 0.f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(a[j], id), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    // int32 -> int8 in order: the packs interleave 128-bit lanes, the permute restores them
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256((__m256i*)(xq + i * QK), _mm256_permutevar8x32_epi32(p8, perm));
    dx[i] = d;
    sx[i] = d * (float)_mm_cvtsi128_si32(s4);
  }
}

// The integer dot products' instruction: 0 AVX2 (maddubs into int16, madd into int32), 1
// AVX-VNNI, 2 AVX512-VNNI on 256-bit registers (vpdpbusd). The sums are exact on every path, so
// the results are bit for bit the same; VNNI only takes fewer instructions. Chosen once, by what
// the CPU has (``LAYERCAKE_NO_VNNI`` forces AVX2: for tests and comparisons). The instruction is
// written as inline assembly: the kernels are built for AVX2, and a VNNI intrinsic would need
// the whole call tree compiled for it.
int dot_isa() {
  static const int isa = [] {
    if (std::getenv("LAYERCAKE_NO_VNNI")) return 0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avxvnni")) return 1;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return 2;
    return 0;
  }();
  return isa;
}

// Whether panels are 16 weight rows on 512-bit vectors: AVX-512 with VNNI, BW and DQ.
// ``LAYERCAKE_NO_AVX512`` (or ``LAYERCAKE_NO_VNNI``) turns it off.
bool wide_panels() {
  static const bool wide = [] {
    if (std::getenv("LAYERCAKE_NO_VNNI") || std::getenv("LAYERCAKE_NO_AVX512")) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return wide;
}

// acc + the sums of each 4 products u[i] * s[i] (u unsigned, s signed bytes) in int32 lanes.
template <int V>
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  static_assert(V == 1 || V == 2);
  if constexpr (V == 1)
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  else
    asm("vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u), "x"(s));
  return acc;
}

// Four bytes of activations in every 32-bit lane.
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// A panel of 8 weight rows (AVX2): rows at base + i * stride, 16 bytes each, transposed by
// 32-bit words: lane i of W[k] = word k of row i.
inline void transpose8x4(const uint8_t* base, int64_t stride, __m256i* W) {
  __m256i A[4];
  for (int j = 0; j < 4; ++j)
    A[j] = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(base + j * stride))),
        _mm_loadu_si128((const __m128i*)(base + (4 + j) * stride)), 1);
  const __m256i t0 = _mm256_unpacklo_epi32(A[0], A[1]), t1 = _mm256_unpackhi_epi32(A[0], A[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(A[2], A[3]), t3 = _mm256_unpackhi_epi32(A[2], A[3]);
  W[0] = _mm256_unpacklo_epi64(t0, t2);
  W[1] = _mm256_unpackhi_epi64(t0, t2);
  W[2] = _mm256_unpacklo_epi64(t1, t3);
  W[3] = _mm256_unpackhi_epi64(t1, t3);
}

// The fp16 fields of a panel's L rows as floats, block-major: d[g * L + i], m[g * L + i].
// ``tr(p, L8)``: 8 blocks' fields of every row from p (2 G bytes apart between d and m) into 8
// vectors of L floats. The last G mod 8 blocks take the same 8-field reads into a scratch
// buffer: a row's 8 fields from any block stay inside the row (its values follow its offsets).
template <int L, class Tr>
inline void panel_fields(const uint8_t* w, int64_t G, float* d, float* m, const Tr& tr) {
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    tr(w + 2 * g, d + g * L);
    tr(w + 2 * G + 2 * g, m + g * L);
  }
  if (g < G) {
    float tail[8 * L];
    tr(w + 2 * g, tail);
    std::memcpy(d + g * L, tail, (G - g) * L * sizeof(float));
    tr(w + 2 * G + 2 * g, tail);
    std::memcpy(m + g * L, tail, (G - g) * L * sizeof(float));
  }
}

// The lines of the panel two ahead, spread over this panel's G blocks: at block g, up to line
// (g + 1) * lines / G (counted without a division in the block loop). Two panels ahead, not one:
// one panel's work is shorter than the memory's latency under load (at one row and two threads
// one ahead measured ~7 % slower than the kernel before panels, two ahead level with it; three
// or four no better), and a burst at the start of a panel measured slower at one row.
constexpr int64_t AHEAD = 2;
struct Spread {
  const char* next;
  int64_t G, step, rem, line = 0, end = 0, r = 0;
  Spread(const uint8_t* next, int64_t bytes, int64_t G)
      : next((const char*)next), G(G), step((bytes + 63) / 64 / G), rem((bytes + 63) / 64 % G) {}
  inline void at() {
    if (!next) return;
    end += step;
    r += rem;
    if (r >= G) r -= G, ++end;
    for (; line < end; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
  }
};

// 8 blocks' fp16 fields of 8 rows (from p, rows rb apart) as floats, block-major: out[8 g + i].
inline void fields8(const uint8_t* p, int64_t rb, float* out) {
  __m256i W[4];
  transpose8x4(p, rb, W);
  const __m256i lo16 = _mm256_set1_epi32(0xFFFF);
  for (int k = 0; k < 4; ++k) {  // word k: blocks 2k (low half) and 2k + 1 (high half)
    const __m256i h = _mm256_permute4x64_epi64(
        _mm256_packus_epi32(_mm256_and_si256(W[k], lo16), _mm256_srli_epi32(W[k], 16)),
        _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_ps(out + 16 * k, _mm256_cvtph_ps(_mm256_castsi256_si128(h)));
    _mm256_storeu_ps(out + 16 * k + 8, _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
  }
}

// R rows of activations against a panel of 8 weight rows (AVX2, or VNNI on 256-bit vectors):
// y[r * ldy + i] for weight row i. Every output is its own chain (see the top of the file): lane
// i of acc[r] and off[r] is output (r, i), block after block.
template <int BITS, int R, int V>
__attribute__((noinline)) void panel8(const uint8_t* w, int64_t rb, int64_t G, const int8_t* xq,
                                      const float* dx, const float* sx, const int32_t* xc,
                                      int64_t K, float* y, int64_t ldy, float* d, float* m,
                                      const uint8_t* next) {
  panel_fields<8>(w, G, d, m, [&](const uint8_t* p, float* out) { fields8(p, rb, out); });
  __m256 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  const uint8_t* qs = w + 4 * G;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  Spread ahead(next, 8 * rb, G);
  for (int64_t g = 0; g < G; ++g) {
    ahead.at();
    __m256i a[4], b[4];  // 4 bits: low and high nibbles; 8 bits: values 0..15 and 16..31
    if constexpr (BITS == 4) {
      transpose8x4(qs + 16 * g, rb, a);
      for (int k = 0; k < 4; ++k) {
        b[k] = _mm256_and_si256(_mm256_srli_epi16(a[k], 4), m4);
        a[k] = _mm256_and_si256(a[k], m4);
      }
    } else {
      transpose8x4(qs + 32 * g, rb, a);
      transpose8x4(qs + 32 * g + 16, rb, b);
    }
    const __m256 dv = _mm256_loadu_ps(d + 8 * g), mv = _mm256_loadu_ps(m + 8 * g);
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * K + QK * g;
      __m256i s;
      if constexpr (BITS == 4 && V == 0) {  // int16 sums: at most 8 * 2 * 15 * 127 = 30480
        __m256i s16 = _mm256_maddubs_epi16(a[0], bcast4(xb));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(b[0], bcast4(xb + 16)));
        for (int k = 1; k < 4; ++k) {
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(a[k], bcast4(xb + 4 * k)));
          s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(b[k], bcast4(xb + 16 + 4 * k)));
        }
        s = _mm256_madd_epi16(s16, ones);
      } else if constexpr (BITS == 4) {
        __m256i s0 = dpbusd<V>(_mm256_setzero_si256(), a[0], bcast4(xb));
        __m256i s1 = dpbusd<V>(_mm256_setzero_si256(), b[0], bcast4(xb + 16));
        for (int k = 1; k < 4; ++k) {
          s0 = dpbusd<V>(s0, a[k], bcast4(xb + 4 * k));
          s1 = dpbusd<V>(s1, b[k], bcast4(xb + 16 + 4 * k));
        }
        s = _mm256_add_epi32(s0, s1);
      } else if constexpr (V == 0) {  // |q| times x with q's sign: pairs at most 2 * 128 * 127
        s = _mm256_setzero_si256();
        for (int k = 0; k < 4; ++k) {
          s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(
              _mm256_sign_epi8(a[k], a[k]), _mm256_sign_epi8(bcast4(xb + 4 * k), a[k])), ones));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(
              _mm256_sign_epi8(b[k], b[k]), _mm256_sign_epi8(bcast4(xb + 16 + 4 * k), b[k])), ones));
        }
      } else {  // q + 128 (unsigned) times x, from -128 times x's sum
        const __m256i bias = _mm256_set1_epi8((char)0x80);
        __m256i s0 = _mm256_set1_epi32(xc[r * (K / QK) + g]), s1 = _mm256_setzero_si256();
        for (int k = 0; k < 4; ++k) {
          s0 = dpbusd<V>(s0, _mm256_xor_si256(a[k], bias), bcast4(xb + 4 * k));
          s1 = dpbusd<V>(s1, _mm256_xor_si256(b[k], bias), bcast4(xb + 16 + 4 * k));
        }
        s = _mm256_add_epi32(s0, s1);
      }
      const __m256 sc = _mm256_mul_ps(dv, _mm256_set1_ps(dx[r * (K / QK) + g]));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, acc[r]);
      off[r] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx[r * (K / QK) + g]), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * ldy, _mm256_add_ps(acc[r], off[r]));
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

// A panel of 16 weight rows: rows at base + i * stride, 16 bytes each, transposed by 32-bit
// words: lane i of W[k] = word k of row i.
inline void transpose16x4(const uint8_t* base, int64_t stride, __m512i* W) {
  __m512i A[4];
  for (int j = 0; j < 4; ++j) {
    __m512i a = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i*)(base + j * stride)));
    for (int q = 1; q < 4; ++q)
      a = _mm512_inserti32x4(a, _mm_loadu_si128((const __m128i*)(base + (4 * q + j) * stride)), q);
    A[j] = a;
  }
  const __m512i t0 = _mm512_unpacklo_epi32(A[0], A[1]), t1 = _mm512_unpackhi_epi32(A[0], A[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(A[2], A[3]), t3 = _mm512_unpackhi_epi32(A[2], A[3]);
  W[0] = _mm512_unpacklo_epi64(t0, t2);
  W[1] = _mm512_unpackhi_epi64(t0, t2);
  W[2] = _mm512_unpacklo_epi64(t1, t3);
  W[3] = _mm512_unpackhi_epi64(t1, t3);
}

inline __m512i bcast4x16(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// panel8 on 512-bit vectors, 16 weight rows (AVX-512 VNNI): the same operations per output.
template <int BITS, int R>
__attribute__((noinline)) void panel16(const uint8_t* w, int64_t rb, int64_t G,
                                       const int8_t* xq, const float* dx, const float* sx,
                                       const int32_t* xc, int64_t K, float* y, int64_t ldy,
                                       float* d, float* m, const uint8_t* next) {
  panel_fields<16>(w, G, d, m, [&](const uint8_t* p, float* out) {
    __m512i W[4];
    transpose16x4(p, rb, W);
    for (int k = 0; k < 4; ++k) {  // word k: blocks 2k (low half) and 2k + 1 (high half)
      _mm512_storeu_ps(out + 32 * k, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(W[k])));
      _mm512_storeu_ps(out + 32 * k + 16,
                       _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(W[k], 16))));
    }
  });
  __m512 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm512_setzero_ps();
  const uint8_t* qs = w + 4 * G;
  const __m512i m4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8((char)0x80);
  Spread ahead(next, 16 * rb, G);
  for (int64_t g = 0; g < G; ++g) {
    ahead.at();
    __m512i a[4], b[4];  // 4 bits: low and high nibbles; 8 bits: q + 128 of values 0..15, 16..31
    if constexpr (BITS == 4) {
      transpose16x4(qs + 16 * g, rb, a);
      for (int k = 0; k < 4; ++k) {
        b[k] = _mm512_and_si512(_mm512_srli_epi16(a[k], 4), m4);
        a[k] = _mm512_and_si512(a[k], m4);
      }
    } else {
      transpose16x4(qs + 32 * g, rb, a);
      transpose16x4(qs + 32 * g + 16, rb, b);
      for (int k = 0; k < 4; ++k) {
        a[k] = _mm512_xor_si512(a[k], bias);
        b[k] = _mm512_xor_si512(b[k], bias);
      }
    }
    const __m512 dv = _mm512_loadu_ps(d + 16 * g), mv = _mm512_loadu_ps(m + 16 * g);
    for (int r = 0; r < R; ++r) {
      const int8_t* xb = xq + r * K + QK * g;
      __m512i s0 = BITS == 4 ? _mm512_setzero_si512() : _mm512_set1_epi32(xc[r * (K / QK) + g]);
      __m512i s1 = _mm512_setzero_si512();
      for (int k = 0; k < 4; ++k) {
        s0 = _mm512_dpbusd_epi32(s0, a[k], bcast4x16(xb + 4 * k));
        s1 = _mm512_dpbusd_epi32(s1, b[k], bcast4x16(xb + 16 + 4 * k));
      }
      const __m512 sc = _mm512_mul_ps(dv, _mm512_set1_ps(dx[r * (K / QK) + g]));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), sc, acc[r]);
      off[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[r * (K / QK) + g]), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(acc[r], off[r]));
}
#pragma GCC pop_options

// Up to RMAX rows of activations (a pass) against one panel of L weight rows.
template <int BITS, int V, int L>
void panel_rows(int64_t rows, const uint8_t* w, int64_t rb, int64_t G, const int8_t* xq,
                const float* dx, const float* sx, const int32_t* xc, int64_t K, float* y,
                int64_t ldy, float* d, float* m, const uint8_t* next) {
#define LAYERCAKE_PANEL(R)                                                                    \
  case R:                                                                                     \
    if constexpr (L == 16)                                                                    \
      return panel16<BITS, R>(w, rb, G, xq, dx, sx, xc, K, y, ldy, d, m, next);               \
    else                                                                                      \
      return panel8<BITS, (R < 4 ? R : 4), V>(w, rb, G, xq, dx, sx, xc, K, y, ldy, d, m, next);
  switch (rows) {
    LAYERCAKE_PANEL(1)
    LAYERCAKE_PANEL(2)
    LAYERCAKE_PANEL(3)
    LAYERCAKE_PANEL(4)
    LAYERCAKE_PANEL(5)
    LAYERCAKE_PANEL(6)
    LAYERCAKE_PANEL(7)
    default: LAYERCAKE_PANEL(8)
  }
#undef LAYERCAKE_PANEL
}

// L = 16 (512-bit panels) or 8 (256-bit); passes of up to 8 (16) or 4 (8) rows of activations.
template <int BITS, int V, int L>
void block_mm(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t BS = BITS == 4 ? 20 : 36, RMAX = L == 16 ? 8 : 4;
  const int64_t G = K / QK, rb = G * BS;
  std::vector<int8_t> xq(M * K);
  std::vector<float> dx(M * G), sx(M * G);
  quantize_rows(x, M, K, xq.data(), dx.data(), sx.data());
  std::vector<int32_t> xc;
  if (BITS == 8) {  // -128 times each block's sum of values (8 bits, VNNI: q + 128 times x)
    xc.resize(M * G);
    for (int64_t i = 0; i < M * G; ++i) {
      int32_t s = 0;
      for (int64_t j = 0; j < QK; ++j) s += xq[i * QK + j];
      xc[i] = -128 * s;
    }
  }
  // Up to RMAX rows pass over the weights once: each thread then streams long runs of panels
  // (two tasks a thread), which the hardware prefetcher follows far better than pieces taken in
  // turns; more rows pass over each panel several times, so a task is one panel, small enough
  // to stay in cache between passes.
  const int64_t threads = at::get_num_threads(), panels = (N + L - 1) / L;
  const int64_t chunk = M > RMAX ? 1 : std::max<int64_t>(1, (panels + 2 * threads - 1) / (2 * threads));
  parallel_tasks((panels + chunk - 1) / chunk, [&](int64_t c, int64_t) {
    thread_local std::vector<float> fields;  // the panel's d and m as floats
    thread_local std::vector<uint8_t> pad;   // a last panel of fewer than L rows, zero-filled
    fields.resize(2 * L * G);
    float *d = fields.data(), *m = d + L * G;
    const int64_t p0 = c * chunk, p1 = std::min(panels, p0 + chunk);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * L, nr = std::min<int64_t>(L, N - n0);
      const uint8_t* wp = w + n0 * rb;
      if (nr < L) {
        pad.assign(L * rb, 0);
        std::memcpy(pad.data(), wp, nr * rb);
        wp = pad.data();
      }
      const uint8_t* next =
          p + AHEAD < p1 && (p + AHEAD + 1) * L <= N ? w + (n0 + AHEAD * L) * rb : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += RMAX) {
        const int64_t rows = std::min(RMAX, M - m0);
        float tmp[RMAX * L];
        float* yr = nr < L ? tmp : y + m0 * N + n0;
        const int64_t ldy = nr < L ? L : N;
        panel_rows<BITS, V, L>(rows, wp, rb, G, xq.data() + m0 * K, dx.data() + m0 * G,
                               sx.data() + m0 * G, xc.empty() ? nullptr : xc.data() + m0 * G, K,
                               yr, ldy, d, m, m0 == 0 ? next : nullptr);
        if (nr < L)
          for (int64_t r = 0; r < rows; ++r)
            std::memcpy(y + (m0 + r) * N + n0, tmp + r * L, nr * sizeof(float));
      }
    }
  });
}

// block_mm with the dot-product instruction and panel width this CPU has (dot_isa,
// wide_panels).
template <int BITS>
void block_mm_isa(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  const int isa = dot_isa();
  if (wide_panels())
    block_mm<BITS, 2, 16>(x, w, y, M, N, K);
  else if (isa == 1)
    block_mm<BITS, 1, 8>(x, w, y, M, N, K);
  else if (isa == 2)
    block_mm<BITS, 2, 8>(x, w, y, M, N, K);
  else
    block_mm<BITS, 0, 8>(x, w, y, M, N, K);
}

// What both matmuls take: CPU tensors, x (M, K) float32 and w 2-D of ``wtype`` (``wname``).
void check_operands(const char* op, const at::Tensor& x, const at::Tensor& w,
                    at::ScalarType wtype, const char* wname) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only, got x on ",
              x.device(), ", w on ", w.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, op, ": x must be 2-D float32, got ",
              x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.scalar_type() == wtype && w.dim() == 2, op, ": w must be 2-D ", wname, ", got ",
              w.scalar_type(), " ", w.sizes());
}

// x (M, K) float32 (copied if not contiguous), w (N, K / 32 * block bytes) uint8 blocks at any
// byte address (copied if not contiguous).
at::Tensor block_mm_op(const at::Tensor& x, const at::Tensor& w, int64_t bits) {
  check_operands("block_mm", x, w, at::kByte, "uint8");
  TORCH_CHECK(bits == 4 || bits == 8, "block_mm: bits must be 4 or 8, got ", bits);
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t BS = bits == 4 ? 20 : 36;
  TORCH_CHECK(K % QK == 0 && w.size(1) == K / QK * BS, "block_mm: shapes do not match: x ",
              x.sizes(), ", w ", w.sizes(), ", bits ", bits, " (w needs K / 32 * ", BS,
              " bytes a row, K a multiple of 32)");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  if (bits == 4)
    block_mm_isa<4>(xp, wp, yp, M, N, K);
  else
    block_mm_isa<8>(xp, wp, yp, M, N, K);
  return y;
}

// One query per row against a KV cache: q (B, H, D), keys / values (B, KV, S, D) with unit
// stride in D (any other strides: a view of a longer cache), mask with B * S elements, (B, S) or
// (B, 1, 1, S), bool (false: skip the slot); out (B, H, D). The H / KV query heads of a KV head
// share it (GQA). Masked slots cost nothing, so a cache allocated long but filled short is cheap.
// A row whose slots are all masked gets zeros, as PyTorch's SDPA gives for a bool mask (a plain
// softmax over nothing would be NaN): the callers switch between this kernel and SDPA, and a
// free or padding row of a batch stays finite.
inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t D) {
  int64_t d = 0;
  const __m256 av = _mm256_set1_ps(a);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
  for (; d < D; ++d) y[d] += a * x[d];
}

// o (D = 8 NV floats) = the values weighted by exp(p[s] - mx) over the unmasked slots, divided by
// their sum: the FMAs of axpy in the same order, the sums in registers instead of stored and
// reloaded every slot (the same bits, without a store-to-load wait per slot).
template <int NV>
inline void attend_values(const float* p, const bool* mb, int64_t S, float mx, const float* vb,
                          int64_t vs, float* o) {
  __m256 acc[NV];
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_setzero_ps();
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    if (!mb[s]) continue;
    const float e = std::exp(p[s] - mx);
    total += e;
    const __m256 ev = _mm256_set1_ps(e);
    const float* x = vb + s * vs;
    for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(ev, _mm256_loadu_ps(x + 8 * j), acc[j]);
  }
  const __m256 inv = _mm256_set1_ps(1.f / total);
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(acc[j], inv));
}

void decode_attention_check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& mask) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() &&
                  mask.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && mask.scalar_type() == at::kBool,
              "decode_attention: float32 q, k, v and a bool mask, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type(), ", ", mask.scalar_type());
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q must be (B, H, D) and keys, values (B, KV, S, D), got q ",
              q.sizes(), ", keys ", k.sizes(), ", values ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(KV > 0, "decode_attention: keys need at least one KV head, got ", k.sizes());
  TORCH_CHECK(H % KV == 0, "decode_attention: ", H, " query heads are not a multiple of ", KV,
              " KV heads");
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "decode_attention: shapes do not match: q ",
              q.sizes(), ", keys ", k.sizes());
  TORCH_CHECK(mask.dim() >= 1 && mask.numel() == B * S && mask.size(-1) == S &&
                  (mask.dim() == 1 ? B == 1 : mask.size(0) == B),
              "decode_attention: mask must hold (B, S) = (", B, ", ", S, ") slots, got ",
              mask.sizes());
  TORCH_CHECK((k.stride(3) == 1 && v.stride(3) == 1) || D <= 1,
              "decode_attention: keys and values need unit stride in head_dim, got strides ",
              k.strides(), " and ", v.strides());
}

at::Tensor decode_attention_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& mask, double scale) {
  decode_attention_check(q, k, v, mask);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KV = k.size(1), S = k.size(2);
  at::Tensor qc = q.contiguous(), mc = mask.reshape({B, S}).contiguous();
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const bool* mp = mc.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const int64_t group = H / KV;
  const int64_t grain = std::max<int64_t>(1, ((int64_t)1 << 16) / std::max<int64_t>(1, S * D));
  at::parallel_for(0, B * H, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, kh = h / group;
      const float* qi = qp + i * D;
      const float* kb = kp + b * k.stride(0) + kh * k.stride(1);
      const float* vb = vp + b * v.stride(0) + kh * v.stride(1);
      const bool* mb = mp + b * S;
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (!mb[s]) continue;
        p[s] = dot(qi, kb + s * k.stride(2), D) * (float)scale;
        mx = std::max(mx, p[s]);
      }
      float* o = op + i * D;
      std::fill(o, o + D, 0.f);
      if (mx == -INFINITY) continue;  // nothing to attend to: zeros
      const int64_t vs = v.stride(2);
      switch (D) {  // the common head sizes keep their sums in registers
        case 32: attend_values<4>(p.data(), mb, S, mx, vb, vs, o); continue;
        case 64: attend_values<8>(p.data(), mb, S, mx, vb, vs, o); continue;
        case 96: attend_values<12>(p.data(), mb, S, mx, vb, vs, o); continue;
        case 128: attend_values<16>(p.data(), mb, S, mx, vb, vs, o); continue;
        default: break;
      }
      float total = 0.f;
      for (int64_t s = 0; s < S; ++s) {
        if (!mb[s]) continue;
        const float e = std::exp(p[s] - mx);
        total += e;
        axpy(e, vb + s * v.stride(2), o, D);
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  });
  return out;
}

// exp(x) for 8 floats (Cephes' polynomial on the reduced argument, as in avx_mathfun): relative
// error ~1e-7 over the range that matters; inputs below -88 give 0, above 88 give +inf.
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 big = _mm256_cmp_ps(x, hi, _CMP_GT_OQ), small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), big);
  return _mm256_blendv_ps(y, _mm256_setzero_ps(), small);
}

// SwiGLU's gate: x (M, 2 I) holds gate | up of each row; y (M, I) = silu(gate) * up. One op
// instead of two slices, silu and a multiply.
at::Tensor silu_mul_op(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 &&
                  x.size(-1) % 2 == 0,
              "silu_mul: float32 CPU x (.., 2 I), got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  const int64_t I = shape.back() / 2, M = I ? xc.numel() / (2 * I) : 0;
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(I, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float *g = xp + r * 2 * I, *u = g + I;
      float* o = yp + r * I;
      int64_t i = 0;
      for (; i + 8 <= I; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_xor_ps(gv, sign));  // exp(-g)
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
      }
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return y;
}

// A one-token step's attention from fused projections: qkv (B, (H + 2 KV) D) holds q, k, v of
// each row; q and k are rotated (rotate-half RoPE with cos / sin of B * D values), k and v written
// into slot ``slot`` of the caches (B, KV, capacity, D), and q attends over slots [0, slot]
// (``decode_attention`` with ``mask``). Returns (B, H * D). One call instead of a dozen small ops
// a layer: a one-token step is bound by calls, not arithmetic.
inline void rotate_half(const float* x, const float* c, const float* s, float* y, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) y[i] = x[i] * c[i] - x[i + h] * s[i];
  for (int64_t i = h; i < D; ++i) y[i] = x[i] * c[i] + x[i - h] * s[i];
}

at::Tensor decode_step_op(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          at::Tensor cache_k, at::Tensor cache_v, int64_t slot,
                          const at::Tensor& mask, double scale, int64_t H) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_v.sizes() == cache_k.sizes(),
              "decode_step: caches must be (B, KV, capacity, D), got ", cache_k.sizes(), " and ",
              cache_v.sizes());
  const int64_t B = cache_k.size(0), KV = cache_k.size(1), D = cache_k.size(3);
  TORCH_CHECK(KV > 0 && H > 0 && H % KV == 0 && D % 2 == 0, "decode_step: ", H,
              " query heads, ", KV, " KV heads, head_dim ", D,
              " (H a multiple of KV >= 1, head_dim even)");
  TORCH_CHECK(qkv.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu() &&
                  cache_k.device().is_cpu() && cache_v.device().is_cpu(),
              "decode_step: CPU tensors only");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat &&
                  cache_v.scalar_type() == at::kFloat,
              "decode_step: float32 qkv, cos, sin and caches");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (H + 2 * KV) * D,
              "decode_step: qkv must be (B, (H + 2 KV) D) = (", B, ", ", (H + 2 * KV) * D,
              "), got ", qkv.sizes());
  TORCH_CHECK(cos.numel() == B * D && sin.numel() == B * D, "decode_step: cos and sin need B * D = ",
              B * D, " values, got ", cos.numel(), " and ", sin.numel());
  TORCH_CHECK(slot >= 0 && slot < cache_k.size(2), "decode_step: slot ", slot,
              " outside the cache's capacity ", cache_k.size(2));
  TORCH_CHECK(cache_k.stride(3) == 1 && cache_v.stride(3) == 1,
              "decode_step: caches need unit stride in head_dim");
  const at::Tensor x = qkv.contiguous(), c = cos.contiguous(), sn = sin.contiguous();
  at::Tensor q = at::empty({B, H, D}, qkv.options());
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = cache_k.data_ptr<float>(), *vp = cache_v.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float* row = xp + b * (H + 2 * KV) * D;
    const float *cb = cp + b * D, *sb = sp + b * D;
    for (int64_t h = 0; h < H; ++h) rotate_half(row + h * D, cb, sb, qp + (b * H + h) * D, D);
    for (int64_t j = 0; j < KV; ++j) {
      const int64_t at = b * cache_k.stride(0) + j * cache_k.stride(1) + slot * cache_k.stride(2);
      const int64_t av = b * cache_v.stride(0) + j * cache_v.stride(1) + slot * cache_v.stride(2);
      rotate_half(row + (H + j) * D, cb, sb, kp + at, D);
      std::memcpy(vp + av, row + (H + KV + j) * D, D * sizeof(float));
    }
  }
  at::Tensor out = decode_attention_op(q, cache_k.narrow(2, 0, slot + 1),
                                       cache_v.narrow(2, 0, slot + 1), mask, scale);
  return out.view({B, H * D});
}

// bf16_mm: y (M, N) fp32 = x (M, K) fp32 @ W.T for W (N, K) bf16, converting W's values in
// registers (a bf16 is the top half of a float: widen and shift), so an offloaded bf16 layer
// needs no fp32 copy of its weights. Tiles of MR activation rows x NR weight rows, 12 FMA chains,
// over K in blocks of KC (the tile's activations stay in L2); each task owns NC weight rows
// (kept in L2 while every activation tile passes over them). The tile shape, KC and NC were
// chosen by measurement over several shapes (4x3 beat 6x2; larger K blocks beat 512; tasks of
// 48-192 rows were within noise of each other): the README has the figures.
// W is addressed by bytes (``w`` + 2 * element index), so it may start at any address.
constexpr int64_t MR = 4, NR = 3, KC = 4096, NC = 96;

inline __m256 bf16x8(const uint8_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(u16x8_at(p)), 16));
}

template <int R, int C>
inline void bf16_tile(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t k0,
                      int64_t k1, float* y, int64_t ldy) {
  const bool first = k0 == 0;  // y is stored by the first K block, added to by the others
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t k = k0;
  for (; k + 8 <= k1; k += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = bf16x8(w + 2 * (c * ldw + k));
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t kk = k; kk < k1; ++kk) {  // K not a multiple of 8
        uint32_t bits = (uint32_t)u16_at(w + 2 * (c * ldw + kk)) << 16;
        float wf;
        std::memcpy(&wf, &bits, 4);
        s += x[r * ldx + kk] * wf;
      }
      y[r * ldy + c] = first ? s : y[r * ldy + c] + s;
    }
}

template <int R>
inline void bf16_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t ldw, int64_t k0,
                      int64_t k1, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    bf16_tile<R, NR>(x, ldx, w + 2 * n * ldw, ldw, k0, k1, y + n, ldy);
  for (; n < n1; ++n) bf16_tile<R, 1>(x, ldx, w + 2 * n * ldw, ldw, k0, k1, y + n, ldy);
}

// x (M, K) float32 and w (N, K) bf16 at any byte address, each copied if not contiguous.
void bf16_mm_check(const at::Tensor& x, const at::Tensor& w) {
  check_operands("bf16_mm", x, w, at::kBFloat16, "bf16");
  TORCH_CHECK(x.size(1) == w.size(1), "bf16_mm: shapes do not match: x ", x.sizes(), ", w ",
              w.sizes());
}

// y (M, N), any row stride (a column range of a wider output), = x @ W.T
void bf16_mm_into(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    y.zero_();
    return;
  }
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = (const uint8_t*)wc.data_ptr();  // any byte address (see bf16x8)
  float* yp = y.data_ptr<float>();
  const int64_t ldy = y.stride(0);
  // The weights of the block after this one (the task's next K block, or the thread's next task)
  // are prefetched into L2 a slice per pass of activation rows: the first pass over a block would
  // otherwise wait on DRAM alone (a 4x3 tile wants ~8 bytes of weights a cycle, more than the
  // memory gives two cores), which at 32 rows is an eighth of the passes.
  const int64_t passes = M / MR + M % MR;
  parallel_tasks((N + NC - 1) / NC, [&](int64_t c, int64_t next) {
    const int64_t n0 = c * NC, n1 = std::min(N, n0 + NC);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t k1 = std::min(K, k0 + KC);
      // the next block: rows [p0, p1), columns [q0, q1)
      int64_t p0 = n0, p1 = n1, q0 = k1, q1 = std::min(K, k1 + KC);
      if (k1 >= K) {
        p0 = next < 0 ? 0 : next * NC, p1 = next < 0 ? 0 : std::min(N, p0 + NC), q0 = 0;
        q1 = std::min(K, KC);
      }
      const int64_t per_pass = passes > 1 ? (p1 - p0 + passes - 1) / passes : 0;
      int64_t pass = 0;
      auto prefetch = [&]() {
        const int64_t r0 = p0 + pass * per_pass, r1 = std::min(p1, r0 + per_pass);
        for (int64_t r = r0; r < r1; ++r) {
          const char* row = (const char*)(wp + 2 * (r * K + q0));
          for (int64_t b = 0; b < (q1 - q0) * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
        }
        ++pass;
      };
      int64_t m = 0;
      for (; m + MR <= M; m += MR) {
        prefetch();
        bf16_rows<MR>(xp + m * K, K, wp, K, k0, k1, yp + m * ldy, ldy, n0, n1);
      }
      for (; m < M; ++m) {
        prefetch();
        bf16_rows<1>(xp + m * K, K, wp, K, k0, k1, yp + m * ldy, ldy, n0, n1);
      }
    }
  });
}

at::Tensor bf16_mm_op(const at::Tensor& x, const at::Tensor& w) {
  bf16_mm_check(x, w);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  bf16_mm_into(x, w, y);
  return y;
}

void bf16_mm_out_op(const at::Tensor& x, const at::Tensor& w, at::Tensor y) {
  bf16_mm_check(x, w);
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 &&
                  y.size(0) == x.size(0) && y.size(1) == w.size(0) &&
                  (y.stride(1) == 1 || y.size(1) <= 1) && y.stride(0) >= y.size(1),
              "bf16_mm_out: y must be float32 (M, N) with unit column stride, got ", y.sizes(),
              " strides ", y.strides());
  bf16_mm_into(x, w, y);
}

}  // namespace

// RMSNorm over the last dimension: y = x / sqrt(mean(x^2) + eps) * w, all in fp32 (as
// transformers computes it). One op instead of PyTorch's CPU composite (pow, mean, rsqrt, two
// multiplies and their temporaries): a one-token step runs two of these a layer.
void rms_norm_rows(const float* x, const float* w, float* y, int64_t D, double eps) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 v = _mm256_loadu_ps(x + d);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float ss = hsum(acc);
  for (; d < D; ++d) ss += x[d] * x[d];
  const float r = 1.f / std::sqrt(ss / (float)D + (float)eps);
  const __m256 rv = _mm256_set1_ps(r);
  d = 0;
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + d), rv),
                                          _mm256_loadu_ps(w + d)));
  for (; d < D; ++d) y[d] = x[d] * r * w[d];
}

at::Tensor rms_norm_op(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "rms_norm: float32 x and weight, got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && x.size(-1) == w.size(0),
              "rms_norm: weight must be (D,) for x (.., D), got x ", x.sizes(), ", weight ",
              w.sizes());
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t D = x.size(-1), M = D ? xc.numel() / D : 0;
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) rms_norm_rows(xp + r * D, wp, yp + r * D, D, eps);
                   });
  return y;
}

// A prompt's q and k in place in fused projections: qkv (R, (H + 2 KV) D) holds q, k, v of each
// of R rows; q (H D values) and k (KV D) go through their RMS norms (``qw`` / ``kw``: over the
// whole projection or per head, by their length; empty: none), then rotate-half RoPE with cos /
// sin (R * D values). The values are those of ``rms_norm`` and of ``x * cos + rotated * sin`` as
// PyTorch's separate ops give them (each product rounded, then the sum), bit for bit; in place,
// a large prompt's pass needs none of the (R, (H + KV) D) temporaries of those ops (moe11: at
// B=64 x 16 about 100 MB of fresh pages for each pass's first layer, ~7 us a page fault here).
void qk_norm_rope_op(at::Tensor qkv, const at::Tensor& qw, const at::Tensor& kw, double eps,
                     const at::Tensor& cos, const at::Tensor& sin, int64_t H, int64_t KV) {
  TORCH_CHECK(qkv.device().is_cpu() && qw.device().is_cpu() && kw.device().is_cpu() &&
                  cos.device().is_cpu() && sin.device().is_cpu(),
              "qk_norm_rope: CPU tensors only");
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qw.scalar_type() == at::kFloat &&
                  kw.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "qk_norm_rope: float32 qkv, weights, cos and sin");
  TORCH_CHECK(H > 0 && KV > 0 && qkv.dim() >= 1 && qkv.is_contiguous(),
              "qk_norm_rope: contiguous qkv (.., (H + 2 KV) D) and H, KV >= 1, got ", qkv.sizes(),
              ", H ", H, ", KV ", KV);
  const int64_t W = qkv.size(-1), D = W / (H + 2 * KV), R = W ? qkv.numel() / W : 0;
  TORCH_CHECK(D > 0 && D % 2 == 0 && W == (H + 2 * KV) * D,
              "qk_norm_rope: the last dim ", W, " is not (H + 2 KV) * head_dim for H ", H,
              ", KV ", KV, " and an even head_dim");
  TORCH_CHECK(cos.numel() == R * D && sin.numel() == R * D, "qk_norm_rope: cos and sin need ",
              R * D, " values (rows x head_dim), got ", cos.numel(), " and ", sin.numel());
  const int64_t nq = qw.numel(), nk = kw.numel();
  TORCH_CHECK((nq == 0 || ((H * D) % nq == 0 && nq % D == 0)) &&
                  (nk == 0 || ((KV * D) % nk == 0 && nk % D == 0)),
              "qk_norm_rope: the norms' weights must be empty, head_dim or the projection long; "
              "got ", nq, " and ", nk, " for head_dim ", D);
  const at::Tensor c = cos.contiguous(), sn = sin.contiguous(), qwc = qw.contiguous(),
                   kwc = kw.contiguous();
  float* xp = qkv.data_ptr<float>();
  const float *cp = c.data_ptr<float>(), *sp = sn.data_ptr<float>(), *qwp = qwc.data_ptr<float>(),
              *kwp = kwc.data_ptr<float>();
  at::parallel_for(0, R, std::max<int64_t>(1, 8192 / W), [&](int64_t r0, int64_t r1) {
    std::vector<float> head(D);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = xp + r * W;
      for (int64_t i = 0; nq && i < H * D; i += nq) rms_norm_rows(row + i, qwp, row + i, nq, eps);
      float* k = row + H * D;
      for (int64_t i = 0; nk && i < KV * D; i += nk) rms_norm_rows(k + i, kwp, k + i, nk, eps);
      const float *cr = cp + r * D, *sr = sp + r * D;
      for (int64_t h = 0; h < H + KV; ++h) {
        std::memcpy(head.data(), row + h * D, D * sizeof(float));
        rotate_half(head.data(), cr, sr, row + h * D, D);
      }
    }
  });
}

TORCH_LIBRARY(layercake, m) {
  m.def("block_mm(Tensor x, Tensor w, int bits) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("bf16_mm(Tensor x, Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("decode_step(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "int slot, Tensor mask, float scale, int H) -> Tensor");
  m.def("bf16_mm_out(Tensor x, Tensor w, Tensor(a!) y) -> ()");
  m.def("qk_norm_rope(Tensor(a!) qkv, Tensor qw, Tensor kw, float eps, Tensor cos, Tensor sin, "
        "int H, int KV) -> ()");
}

TORCH_LIBRARY_IMPL(layercake, CPU, m) {
  m.impl("block_mm", &block_mm_op);
  m.impl("decode_attention", &decode_attention_op);
  m.impl("bf16_mm", &bf16_mm_op);
  m.impl("rms_norm", &rms_norm_op);
  m.impl("silu_mul", &silu_mul_op);
  m.impl("decode_step", &decode_step_op);
  m.impl("bf16_mm_out", &bf16_mm_out_op);
  m.impl("qk_norm_rope", &qk_norm_rope_op);
}
