// amx_bf16x3_mm: y (M, N) fp32 = x (M, K) fp32 @ W.T for W (N, K) bf16, on AMX bf16 tiles,
// with the products of an fp32 GEMM (built with kernels.cpp by layercake/ops/kernels.py).
//
// Each fp32 activation is split exactly into three bf16 parts, x = hi + mid + lo (hi = bf16(x),
// mid = bf16(x - hi), lo = x - hi - mid: 24 bits of significand in three pieces of 8), so
// W x = W hi + W mid + W lo. A bf16 x bf16 product is exact in fp32 and TDPBF16PS accumulates in
// fp32: the result is an fp32 GEMM's up to the order of the additions (tests/test_amx.py checks
// it against a float64 reference). The weights are read as stored, never repacked in memory: a
// tile of W (16 rows x 32 k) is the A operand, read from W (for many rows a task copies its
// panel into L2 in tile order, a K block at a time, as it goes); x's parts are packed once a call
// into the B operand's layout (pairs of k interleaved, 16 activation rows a tile), so each tile
// product is a 16 x 16 block of y transposed (weight rows x activation rows).
//
// Blocking: a task owns NB weight rows; it walks K in blocks of KC and, within one, every pair
// of activation tiles (32 rows) over every pair of weight tiles (32 rows), keeping the 4 result
// tiles in a per-task scratch between K blocks. The task's weight panel (NB x KC bf16) stays in
// L2 while the activation tiles pass over it, copied there in tile order a K block at a time
// (zeros past N and K) unless it is read only once; activation rows past M are zeros. Everything AMX is compiled for its
// target only (target pragma) and runs only where the CPU and the kernel allow it
// (``amx_available``): elsewhere it is never called.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int64_t NB = 256;  // weight rows a task
constexpr int64_t KC = 512;  // k a block (a multiple of 32)
constexpr int64_t MC = 256;  // activation rows a chunk, at most
constexpr int64_t PACKED_BYTES = 8 << 20;  // and at most this many bytes of packed parts

// GCC 11 has the AMX intrinsics and the target pragma used below; other compilers build the ops
// without them (amx_available() is then false and the op refuses to run).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define LAYERCAKE_AMX 1
#else
#define LAYERCAKE_AMX 0
#endif

// Whether this CPU has AMX-BF16 and AVX512-BF16 and Linux lets this process use the tiles
// (asked once: ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool amx_usable() {
  if (!LAYERCAKE_AMX) return false;
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool avx512f = b & (1u << 16), amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
    if (!(avx512f && amx_bf16 && amx_tile)) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // avx512bf16
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

#if LAYERCAKE_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes: tiles 0-3 results, 4-5 weights (A), 6-7 activations (B).
void configure_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// x's rows [m0, m0 + 16) (rows past M are zeros), k [k0, k0 + 32) (past K zeros) into three
// B tiles (hi, mid, lo) at dst: row j of a tile holds, for each activation row m, the pair
// (part(x[m][k0 + 2j]), part(x[m][k0 + 2j + 1])) at bytes 4m.
void pack_tile(const float* x, int64_t M, int64_t K, int64_t m0, int64_t k0, uint32_t* dst) {
  alignas(64) uint32_t rows[3][16][16];  // [part][m][pair]
  const int64_t kn = std::min<int64_t>(32, K - k0);
  const __mmask16 lo_mask = kn >= 16 ? 0xFFFF : (__mmask16)((1u << kn) - 1);
  const __mmask16 hi_mask = kn >= 32 ? 0xFFFF : kn <= 16 ? 0 : (__mmask16)((1u << (kn - 16)) - 1);
  for (int m = 0; m < 16; ++m) {
    __m512 v[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    if (m0 + m < M) {
      const float* p = x + (m0 + m) * K + k0;
      v[0] = _mm512_maskz_loadu_ps(lo_mask, p);
      v[1] = _mm512_maskz_loadu_ps(hi_mask, p + 16);
    }
    for (int h = 0; h < 2; ++h) {
      __m512 r = v[h];
      for (int part = 0; part < 3; ++part) {
        const __m256bh b = _mm512_cvtneps_pbh(r);
        _mm256_store_si256((__m256i*)&rows[part][m][8 * h], (__m256i)b);
        if (part < 2) {
          r = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32((__m256i)b), 16)));  // b as fp32
          // inf - inf: a non-finite x is carried by hi alone
          r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r, r, _CMP_ORD_Q), r);
        }
      }
    }
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                                          4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(16));
  for (int part = 0; part < 3; ++part)
    for (int j = 0; j < 16; ++j)  // row j of the tile: pair j of every activation row
      _mm512_storeu_si512(dst + part * 256 + j * 16,
                         _mm512_i32gather_epi32(idx, &rows[part][0][j], 4));
}

// The packed activations: for m-tile t and k block kb (32 k), three tiles (hi, mid, lo) at
// packed + ((t * KB + kb) * 3 + part) * 256 u32.
void pack_activations(const float* x, int64_t M, int64_t K, int64_t MT, int64_t KB,
                      uint32_t* packed) {
  at::parallel_for(0, MT * KB, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / KB, kb = i % KB;
      pack_tile(x, M, K, t * 16, kb * 32, packed + i * 3 * 256);
    }
  });
}

// Result tiles for weight tiles (a0, a0 + 16 rows) x activation tiles (t, t + 1) over k blocks
// [kb0, kb1), stored into c (4 tiles of 16 x 16 fp32, [weight tile][activation tile]) if first,
// else added to it in fp32 (each K block sums from zero: a sum over all of K in one tile
// would round K * 3 times in a row, several times an fp32 GEMM's error at K = 8192). The
// weight tiles of k block kb0 + i: a + i * ks and a + i * ks + ws, rows lda bytes apart.
template <int TM>
void tile_block(const uint8_t* a, int64_t lda, int64_t ks, int64_t ws, const uint32_t* packed,
                int64_t KB, int64_t t, int64_t kb0, int64_t kb1, float* c, bool first) {
  alignas(64) float tmp[1024];
  float* dst = first ? c : tmp;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const uint32_t* b0 = packed + t * KB * 768;
  const uint32_t* b1 = b0 + KB * 768;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    _tile_loadd(4, a + (kb - kb0) * ks, lda);
    _tile_loadd(5, a + (kb - kb0) * ks + ws, lda);
    for (int part = 0; part < 3; ++part) {
      _tile_loadd(6, b0 + (kb * 3 + part) * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (TM == 2) {
        _tile_loadd(7, b1 + (kb * 3 + part) * 256, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  _tile_stored(0, dst, 64); _tile_stored(1, dst + 256, 64);
  _tile_stored(2, dst + 512, 64); _tile_stored(3, dst + 768, 64);
  if (!first)
    for (int i = 0; i < 1024; i += 16)
      _mm512_storeu_ps(c + i, _mm512_add_ps(_mm512_loadu_ps(c + i), _mm512_load_ps(tmp + i)));
}

// W's rows [n0, n0 + rows) and k blocks [kb0, kb1) into ``panel`` in tile order: for each pair
// of weight tiles (32 rows), for each k block, two 1 KB tiles (16 rows x 32 k); rows past the
// panel and k past K are zeros. The tiles then load from a few pages of L2 rather than 16 rows
// of the checkpoint's map (4 KB pages: a tile load touched 16 of them).
void copy_panel(const uint8_t* w, int64_t K, int64_t n0, int64_t rows, int64_t kb0, int64_t kb1,
                uint8_t* panel) {
  const int64_t nkb = kb1 - kb0, rp = (rows + 31) / 32 * 32;
  for (int64_t r = 0; r < rp; ++r) {
    uint8_t* dst = panel + (r / 32) * nkb * 2048 + ((r % 32) / 16) * 1024 + (r % 16) * 64;
    const uint8_t* src = w + 2 * ((n0 + r) * K + kb0 * 32);
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t kn = r < rows ? std::min<int64_t>(32, K - (kb0 + kb) * 32) : 0;
      const __mmask32 mask = kn >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << kn) - 1);
      _mm512_storeu_si512(dst + kb * 2048, _mm512_maskz_loadu_epi16(mask, src + kb * 64));
    }
  }
}

// One task: weight rows [n0, n1) of y, over k blocks of KC. With several pairs of activation
// tiles (each reads the panel again) or a tail, the panel is copied a block at a time; with one
// (a decode step's 32 rows) each weight is read once, straight from W.
void amx_task(const uint8_t* w, int64_t K, uint8_t* panel, const uint32_t* packed, int64_t MT,
              int64_t KB, float* scratch, float* y, int64_t ldy, int64_t M, int64_t n0,
              int64_t n1) {
  const int64_t rows = n1 - n0, NP = (rows + 31) / 32, MP = (MT + 1) / 2;
  for (int64_t kb0 = 0; kb0 < KB; kb0 += KC / 32) {
    const int64_t kb1 = std::min(KB, kb0 + KC / 32);
    const bool copy = MP > 1 || rows % 32 || K % 32;
    if (copy) copy_panel(w, K, n0, rows, kb0, kb1, panel);
    const int64_t lda = copy ? 64 : 2 * K, ks = copy ? 2048 : 64, ws = copy ? 1024 : 16 * lda;
    for (int64_t mp = 0; mp < MP; ++mp)
      for (int64_t np = 0; np < NP; ++np) {
        float* c = scratch + (np * MP + mp) * 4 * 256;
        const uint8_t* ap = copy ? panel + np * (kb1 - kb0) * 2048
                                 : w + 2 * ((n0 + 32 * np) * K + kb0 * 32);
        if (2 * mp + 1 < MT)
          tile_block<2>(ap, lda, ks, ws, packed, KB, 2 * mp, kb0, kb1, c, kb0 == 0);
        else
          tile_block<1>(ap, lda, ks, ws, packed, KB, 2 * mp, kb0, kb1, c, kb0 == 0);
      }
  }
  // scratch tile [np][mp][wt][at] holds y[m][n] for n = n0 + 32 np + 16 wt + i (row i),
  // m = 32 mp + 16 at + j (column j)
  const __m512i col = _mm512_mullo_epi32(
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(16));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t mp = m / 32, at = (m % 32) / 16, j = m % 16;
    for (int64_t n = n0; n < n1; n += 16) {
      const int64_t i = n - n0, np = i / 32, wt = (i % 32) / 16;
      const float* tile = scratch + (np * MP + mp) * 1024 + (wt * 2 + at) * 256;
      const __m512 v = _mm512_i32gather_ps(col, tile + j, 4);
      const int64_t left = n1 - n;
      _mm512_mask_storeu_ps(y + m * ldy + n, left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1),
                            v);
    }
  }
}

void amx_chunk(const float* x, const uint8_t* w, float* y, int64_t M, int64_t K, int64_t N,
               int64_t ldy) {
  const int64_t MT = (M + 15) / 16, KB = (K + 31) / 32;
  std::unique_ptr<uint32_t[]> packed(new uint32_t[(size_t)MT * KB * 768]);  // not zeroed
  pack_activations(x, M, K, MT, KB, packed.get());
  const int64_t tasks = (N + NB - 1) / NB;
  at::parallel_for(0, tasks, 1, [&](int64_t c0, int64_t c1) {
    configure_tiles();
    const int64_t MP = (MT + 1) / 2;
    std::vector<float> scratch((size_t)(NB / 32) * MP * 1024);
    const bool copies = MT > 2 || N % 32 || K % 32;  // as amx_task decides, for any task
    std::unique_ptr<uint8_t[]> panel(copies ? new uint8_t[(size_t)NB * KC * 2] : nullptr);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n0 = c * NB, n1 = std::min(N, n0 + NB);
      amx_task(w, K, panel.get(), packed.get(), MT, KB, scratch.data(), y, ldy, M, n0, n1);
    }
    _tile_release();
  });
}

// Activation rows in chunks: the packed parts of a chunk (6 bytes a value) stay small.
void amx_mm(const float* x, const uint8_t* w, float* y, int64_t M, int64_t K, int64_t N,
            int64_t ldy) {
  const int64_t mc = std::max<int64_t>(16, std::min(MC, PACKED_BYTES / (6 * K) / 16 * 16));
  for (int64_t m0 = 0; m0 < M; m0 += mc)
    amx_chunk(x + m0 * K, w, y + m0 * ldy, std::min(mc, M - m0), K, N, ldy);
}

#pragma GCC pop_options
#else
void amx_mm(const float*, const uint8_t*, float*, int64_t, int64_t, int64_t, int64_t) {}
#endif

void amx_check(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(amx_usable(), "amx_bf16x3_mm: this CPU (or kernel) does not offer AMX-BF16");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "amx_bf16x3_mm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2,
              "amx_bf16x3_mm: x must be 2-D float32, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2,
              "amx_bf16x3_mm: w must be 2-D bf16, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "amx_bf16x3_mm: shapes do not match: x ", x.sizes(),
              ", w ", w.sizes());
}

void amx_into(const at::Tensor& x, const at::Tensor& w, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    y.zero_();
    return;
  }
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  amx_mm(xc.data_ptr<float>(), (const uint8_t*)wc.data_ptr(), y.data_ptr<float>(), M, K, N,
         y.stride(0));
}

at::Tensor amx_bf16x3_mm_op(const at::Tensor& x, const at::Tensor& w) {
  amx_check(x, w);
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  amx_into(x, w, y);
  return y;
}

void amx_bf16x3_mm_out_op(const at::Tensor& x, const at::Tensor& w, at::Tensor y) {
  amx_check(x, w);
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 2 &&
                  y.size(0) == x.size(0) && y.size(1) == w.size(0) &&
                  (y.stride(1) == 1 || y.size(1) <= 1) && y.stride(0) >= y.size(1),
              "amx_bf16x3_mm_out: y must be float32 (M, N) with unit column stride, got ",
              y.sizes(), " strides ", y.strides());
  amx_into(x, w, y);
}

bool amx_available_op() { return amx_usable(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(layercake, m) {
  m.def("amx_available() -> bool");
  m.def("amx_bf16x3_mm(Tensor x, Tensor w) -> Tensor");
  m.def("amx_bf16x3_mm_out(Tensor x, Tensor w, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(layercake, CPU, m) {
  m.impl("amx_bf16x3_mm", &amx_bf16x3_mm_op);
  m.impl("amx_bf16x3_mm_out", &amx_bf16x3_mm_out_op);
}

TORCH_LIBRARY_IMPL(layercake, CompositeExplicitAutograd, m) {
  m.impl("amx_available", &amx_available_op);
}
