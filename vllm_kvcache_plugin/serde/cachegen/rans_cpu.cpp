// CacheGen rANS lanes on the CPU: the same stream layout as rans_numpy.py (the reference) and
// triton_coder.py, one lane group at a time, the 64 lanes of a group interleaved so that their
// independent table lookups overlap (eight at once in vector registers where the build has AVX2).
// Plain C ABI (called through ctypes, which releases the GIL, so callers split groups across
// threads). No torch headers: it compiles in about a second.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

constexpr uint32_t kProbBits = 11;
constexpr uint32_t kMask = (1u << kProbBits) - 1;
constexpr uint32_t kRansL = 1u << 16;
constexpr uint32_t kRenormShift = 32 - kProbBits;
constexpr int64_t kGroup = 64;
constexpr float kBf16Max = 3.38953139e38f;  // 0x7F7F0000
constexpr float kF32Max = 3.40282347e38f;

inline float from_bf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

template <int IN_KIND>
inline float load(const void* x, int64_t i) {
  if constexpr (IN_KIND == 1) return from_bf16(static_cast<const uint16_t*>(x)[i]);
  return static_cast<const float*>(x)[i];
}

// Round half to even (torch.round) for |y| < 2^22 without SSE4.1's roundps: adding and removing
// 1.5 * 2^23 leaves no fraction bits, so the FPU's default rounding mode does the work (IEEE
// semantics forbid folding it to y; never build this file with -ffast-math).
inline float round_even(float y) {
  constexpr float kMagic = 12582912.0f;
  return (y + kMagic) - kMagic;
}

inline uint16_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round half to even (inputs are finite)
  return static_cast<uint16_t>(bits >> 16);
}

template <int IN_KIND>
int scales(const void* x, int64_t rows, int64_t K, int32_t* bits_out) {
  for (int64_t r = 0; r < rows; ++r) {
    float peak = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(load<IN_KIND>(x, r * K + k));
      finite &= a <= 3.4028234663852886e38f;  // false for inf and NaN
      peak = a > peak ? a : peak;
    }
    if (!finite) return 1;
    uint32_t bits;
    std::memcpy(&bits, &peak, 4);
    uint32_t upper = (bits >> 16) + ((bits & 0xFFFF) != 0);
    bits_out[r] = static_cast<int32_t>(upper > 0x7F7F ? 0x7F7F : upper);
  }
  return 0;
}

template <int IN_KIND>
void quantize(const void* x, int64_t R, int64_t T, int64_t K, const int64_t* half, const float* step,
              uint8_t* sym, int64_t* s1, int64_t* s2) {
  for (int64_t r = 0; r < R; ++r) {
    const float c = static_cast<float>(half[r]);
    int64_t* m1 = s1 + r * K;
    int64_t* m2 = s2 + r * K;
    for (int64_t k = 0; k < K; ++k) m1[k] = m2[k] = 0;
    for (int64_t t = 0; t < T; ++t) {
      const float st = step[r * T + t];
      const int64_t base = (r * T + t) * K;
      for (int64_t k = 0; k < K; ++k) {
        float q = st > 0.0f ? round_even(load<IN_KIND>(x, base + k) / st) : 0.0f;
        q = q < -c ? -c : (q > c ? c : q);
        const int32_t qi = static_cast<int32_t>(q);
        sym[base + k] = static_cast<uint8_t>(qi + half[r]);
        m1[k] += qi;
        m2[k] += qi * qi;
      }
    }
  }
}

// out[base + i] = clamp(sym[i] * st) for i < n, as float32 (OUT_KIND 0) or bfloat16 (1).
template <int OUT_KIND>
inline void store_row(const int32_t* sym, int64_t n, float st, float limit, void* out, int64_t base) {
  for (int64_t i = 0; i < n; ++i) {
    float v = static_cast<float>(sym[i]) * st;
    v = v > limit ? limit : (v < -limit ? -limit : v);  // a rounded-up scale never decodes to inf
    if constexpr (OUT_KIND == 1) static_cast<uint16_t*>(out)[base + i] = to_bf16(v);
    else static_cast<float*>(out)[base + i] = v;
  }
}

#if defined(__AVX2__)
// store_row, eight values at a time: the same float product, clamp and bf16 rounding.
template <int OUT_KIND>
inline void store_row8(const int32_t* sym, int64_t n, float st, float limit, void* out, int64_t base) {
  const __m256 step = _mm256_set1_ps(st), hi = _mm256_set1_ps(limit), lo = _mm256_set1_ps(-limit);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sym + i))), step);
    v = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
    if constexpr (OUT_KIND == 1) {
      __m256i bits = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + base + i), packed);
    } else {
      _mm256_storeu_ps(static_cast<float*>(out) + base + i, v);
    }
  }
  store_row<OUT_KIND>(sym + i, n - i, st, limit, out, base + i);
}

// Eight table reads by index, as scalar loads: on the AVX2-only AMD EPYC measured here they were as
// fast as AVX2's gather instruction, whose cost differs much between CPU models.
template <typename T>
inline __m256i gather(const T* base, __m256i idx) {
  alignas(32) int32_t i[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(i), idx);
  return _mm256_setr_epi32(base[i[0]], base[i[1]], base[i[2]], base[i[3]], base[i[4]], base[i[5]], base[i[6]],
                           base[i[7]]);
}

// The rank of each lane among the lanes of an 8-bit mask that are set, for every mask.
struct alignas(32) Rank8 {
  int32_t index[256][8];
  Rank8() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        index[m][i] = k;
        k += (m >> i) & 1;
      }
    }
  }
};
const Rank8 kRank;

// Eight lanes of a group decoded at once, bit for bit as the scalar loop, in the same word order: the
// lanes that renormalise take the next words of the group's stream in lane order, so a lane's word
// is the one at its rank among them, a permutation (by kRank) of eight words loaded from `ptr`.
struct Simd8 {
  // States; each lane's centre and last anchor symbol; its symbol-table rows (byte offsets into sym_lut)
  // and frequency rows (offsets into freq_cum), for anchor and delta tokens.
  __m256i x, centre, anchor, lut_a, lut_d, fc_a, fc_d;

  void init(const uint32_t* states, const int32_t* centres, const int64_t* rows_anchor, const int64_t* rows_delta,
            const int64_t* sym_base) {
    alignas(32) int32_t la[8], ld[8], fa[8], fd[8];
    for (int i = 0; i < 8; ++i) {
      la[i] = static_cast<int32_t>(rows_anchor[i] << kProbBits);
      ld[i] = static_cast<int32_t>(rows_delta[i] << kProbBits);
      fa[i] = static_cast<int32_t>(sym_base[rows_anchor[i]]);
      fd[i] = static_cast<int32_t>(sym_base[rows_delta[i]]);
    }
    x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(states));
    centre = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(centres));
    anchor = _mm256_setzero_si256();
    lut_a = _mm256_load_si256(reinterpret_cast<const __m256i*>(la));
    lut_d = _mm256_load_si256(reinterpret_cast<const __m256i*>(ld));
    fc_a = _mm256_load_si256(reinterpret_cast<const __m256i*>(fa));
    fc_d = _mm256_load_si256(reinterpret_cast<const __m256i*>(fd));
  }

  // One token: decode eight symbols (centred, into sym[0..8)) and return the stream position after them.
  template <bool LOCALITY>
  int64_t step(bool delta, const uint8_t* sym_lut, const uint32_t* freq_cum, const uint16_t* words, int64_t ptr,
               int32_t* sym) {
    const __m256i slot = _mm256_and_si256(x, _mm256_set1_epi32(kMask));
    __m256i s = gather(sym_lut, _mm256_add_epi32(delta ? lut_d : lut_a, slot));
    const __m256i fcv = gather(freq_cum, _mm256_add_epi32(delta ? fc_d : fc_a, s));
    const __m256i freq = _mm256_and_si256(fcv, _mm256_set1_epi32(0xFFFF));
    const __m256i st = _mm256_sub_epi32(
        _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(x, kProbBits)), slot), _mm256_srli_epi32(fcv, 16));
    const __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(st, 16), _mm256_setzero_si256());
    const int m = _mm256_movemask_ps(_mm256_castsi256_ps(need));
    const __m256i next = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(words + ptr)));
    const __m256i mine = _mm256_permutevar8x32_epi32(
        next, _mm256_load_si256(reinterpret_cast<const __m256i*>(kRank.index[m])));
    x = _mm256_blendv_epi8(st, _mm256_or_si256(_mm256_slli_epi32(st, 16), mine), need);
    if constexpr (LOCALITY) {
      if (!delta) {
        anchor = s;
      } else {
        const __m256i n = _mm256_add_epi32(_mm256_add_epi32(centre, centre), _mm256_set1_epi32(1));
        s = _mm256_add_epi32(s, _mm256_sub_epi32(anchor, centre));
        // s is in [-n, 2n): wrap once, either way.
        s = _mm256_sub_epi32(s, _mm256_andnot_si256(_mm256_cmpgt_epi32(n, s), n));
        s = _mm256_add_epi32(s, _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), s), n));
      }
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sym), _mm256_sub_epi32(s, centre));
    return ptr + __builtin_popcount(static_cast<unsigned>(m));
  }

  void store_state(uint32_t* states) const { _mm256_storeu_si256(reinterpret_cast<__m256i*>(states), x); }
};
#endif

// Where decoded values go when they do not go to a contiguous [R, T, K] tensor (vLLM's paged blocks):
// element (r, t, k) of plane p = r / layers lands at byte address row[r] + token[p * T + t] + channel[p * K + k].
// Only tokens in [t0, t1) are written; those below exact_tokens come from `exact` [R, E, K] (stored as is).
struct Placement {
  const int64_t* row;
  const int64_t* token;
  const int64_t* channel;
  int64_t layers, t0, t1;
  const void* exact;
  int64_t exact_tokens;
};

template <int OUT_KIND>
inline void put_exact(int64_t address, const void* exact, int64_t i) {
  if constexpr (OUT_KIND == 1) *reinterpret_cast<uint16_t*>(address) = static_cast<const uint16_t*>(exact)[i];
  else *reinterpret_cast<float*>(address) = static_cast<const float*>(exact)[i];
}

// Token t of lanes [k0, k0 + n) of row r, already dequantised into `values` (OUT_KIND's element type),
// or taken from the exact tokens, written through the placement.
template <int OUT_KIND>
inline void place_row(const Placement& pl, const void* values, int64_t r, int64_t t, int64_t k0, int64_t n,
                      int64_t T, int64_t K) {
  const int64_t plane = r / pl.layers;
  const int64_t base = pl.row[r] + pl.token[plane * T + t];
  const int64_t* channel = pl.channel + plane * K + k0;
  const bool exact = t < pl.exact_tokens;
  const void* src = exact ? pl.exact : values;
  const int64_t first = exact ? (r * pl.exact_tokens + t) * K + k0 : 0;
  for (int64_t i = 0; i < n; ++i) put_exact<OUT_KIND>(base + channel[i], src, first + i);
}

// One group's lanes (one row r, lanes [k0, k0 + n)) on their way through a placement, token by token,
// written the fastest way their addresses allow:
// * channels contiguous (a plain layout, or cpu_vec's V): each token's lanes are one copy;
// * else, for bf16 where each lane's consecutive tokens are adjacent (cpu_vec's K, stored transposed):
//   eight tokens are gathered, transposed eight lanes at a time and written as 16-byte runs, one per
//   lane, instead of 64 two-byte stores a token;
// * else (cpu_amx, a block boundary inside eight tokens, two-row groups) each element alone.
template <int OUT_KIND>
struct RowWriter {
  using Elem = std::conditional_t<OUT_KIND == 1, uint16_t, float>;
  int64_t base = 0, n = 0, K = 0, exact_tokens = 0;
  const int64_t* token = nullptr;
  const int64_t* channel = nullptr;
  const Elem* exact = nullptr;  // this row's exact tokens at lane k0: token t at exact[t * K]
  bool contiguous = false;
  static constexpr int64_t kTile = 32;  // tokens gathered: a lane's 32 bf16 tokens fill a cache line
  alignas(16) Elem tile[kTile][kGroup];
  int64_t tile_first = 0, tile_count = 0;

  void init(const Placement& pl, int64_t r, int64_t k0, int64_t lanes, int64_t T, int64_t channels) {
    const int64_t plane = r / pl.layers;
    base = pl.row[r];
    token = pl.token + plane * T;
    channel = pl.channel + plane * channels + k0;
    n = lanes;
    K = channels;
    exact_tokens = pl.exact_tokens;
    exact = static_cast<const Elem*>(pl.exact) + r * pl.exact_tokens * channels + k0;
    contiguous = true;
    for (int64_t i = 1; i < n && contiguous; ++i)
      contiguous = channel[i] == channel[0] + i * static_cast<int64_t>(sizeof(Elem));
    tile_count = 0;
  }

  // Where token t's lanes are to be dequantised (`scratch` where they go element by element);
  // then commit(t, that pointer).
  Elem* target(int64_t t, Elem* scratch) {
    if (contiguous) return reinterpret_cast<Elem*>(base + token[t] + channel[0]);
#if defined(__SSE2__)
    if constexpr (OUT_KIND == 1) {
      if (n % 8 == 0) {
        if (tile_count > 0 && token[t] != token[tile_first] + tile_count * static_cast<int64_t>(sizeof(Elem)))
          flush();
        if (tile_count == 0) tile_first = t;
        return tile[tile_count];
      }
    }
#endif
    return scratch;
  }

  void commit(int64_t t, const Elem* written) {
    if (contiguous) return;
#if defined(__SSE2__)
    if constexpr (OUT_KIND == 1) {
      if (n % 8 == 0) {
        if (++tile_count == kTile) flush();
        return;
      }
    }
#endif
    scatter(token[t], written);
  }

  // Token t below exact_tokens: its stored values instead of decoded ones.
  void copy_exact(int64_t t, Elem* to) const {
    for (int64_t i = 0; i < n; ++i) to[i] = exact[t * K + i];
  }

  void scatter(int64_t offset, const Elem* src) const {
    for (int64_t i = 0; i < n; ++i) *reinterpret_cast<Elem*>(base + offset + channel[i]) = src[i];
  }

  void flush() {
    int64_t done = 0;
#if defined(__SSE2__)
    if constexpr (OUT_KIND == 1) {
      done = tile_count / 8 * 8;
      const int64_t at = base + token[tile_first];
      // A full tile gives each lane a whole 64-byte line: streamed (no read for ownership) where aligned.
      const bool stream = tile_count == kTile;
      for (int64_t b = 0; b < n; b += 8) {
        for (int64_t s = 0; s < done; s += 8) {
          __m128i r[8];
          for (int j = 0; j < 8; ++j) r[j] = _mm_load_si128(reinterpret_cast<const __m128i*>(tile[s + j] + b));
          const __m128i t0 = _mm_unpacklo_epi16(r[0], r[1]), t1 = _mm_unpackhi_epi16(r[0], r[1]);
          const __m128i t2 = _mm_unpacklo_epi16(r[2], r[3]), t3 = _mm_unpackhi_epi16(r[2], r[3]);
          const __m128i t4 = _mm_unpacklo_epi16(r[4], r[5]), t5 = _mm_unpackhi_epi16(r[4], r[5]);
          const __m128i t6 = _mm_unpacklo_epi16(r[6], r[7]), t7 = _mm_unpackhi_epi16(r[6], r[7]);
          const __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
          const __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
          const __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
          const __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
          const __m128i lane[8] = {_mm_unpacklo_epi64(u0, u4), _mm_unpackhi_epi64(u0, u4),
                                   _mm_unpacklo_epi64(u1, u5), _mm_unpackhi_epi64(u1, u5),
                                   _mm_unpacklo_epi64(u2, u6), _mm_unpackhi_epi64(u2, u6),
                                   _mm_unpacklo_epi64(u3, u7), _mm_unpackhi_epi64(u3, u7)};
          for (int i = 0; i < 8; ++i) {
            auto* to = reinterpret_cast<__m128i*>(at + channel[b + i] + 2 * s);
            if (stream && ((at + channel[b + i]) & 63) == 0) _mm_stream_si128(to, lane[i]);
            else _mm_storeu_si128(to, lane[i]);
          }
        }
      }
    }
#endif
    for (int64_t j = done; j < tile_count; ++j) scatter(token[tile_first + j], tile[j]);
    tile_count = 0;
  }
};

template <int OUT_KIND, bool LOCALITY>
int decode(const uint16_t* words, const int64_t* offsets, const uint32_t* states, const int64_t* rows_anchor,
           const int64_t* rows_delta, const int64_t* sym_base, const uint8_t* sel, const uint8_t* sym_lut,
           const uint32_t* freq_cum, const int64_t* half, const float* step, int64_t R, int64_t T, int64_t K,
           int64_t g0, int64_t g1, void* out, const Placement* placed) {
  const int64_t lanes = R * K;
  const float limit = OUT_KIND == 1 ? kBf16Max : kF32Max;
  uint32_t x[kGroup];
  int64_t obase[kGroup], rowt[kGroup];
  int32_t centre[kGroup], anchor[kGroup], sym[kGroup];
  alignas(32) float values[kGroup];  // one token's dequantised lanes on their way through a placement
  RowWriter<OUT_KIND> writer;
  const uint8_t* lut_a[kGroup];
  const uint8_t* lut_d[kGroup];
  const uint32_t* fc_a[kGroup];
  const uint32_t* fc_d[kGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t lane0 = g * kGroup;
    const int64_t nl = lanes - lane0 < kGroup ? lanes - lane0 : kGroup;
    int64_t ptr = offsets[g];
    const int64_t end = offsets[g + 1];
    for (int64_t i = 0; i < nl; ++i) {
      const int64_t lane = lane0 + i, row = lane / K;
      x[i] = states[lane];
      if (x[i] < kRansL) return 1;
      rowt[i] = row * T;
      obase[i] = row * T * K + lane % K;
      centre[i] = static_cast<int32_t>(half[row]);
      anchor[i] = 0;
      lut_a[i] = sym_lut + (rows_anchor[lane] << kProbBits);
      lut_d[i] = sym_lut + (rows_delta[lane] << kProbBits);
      fc_a[i] = freq_cum + sym_base[rows_anchor[lane]];
      fc_d[i] = freq_cum + sym_base[rows_delta[lane]];
    }
    const bool one_row = rowt[0] == rowt[nl - 1];
    if (placed != nullptr && one_row) writer.init(*placed, rowt[0] / T, obase[0] % K, nl, T, K);
#if defined(__AVX2__)
    Simd8 simd[kGroup / 8];
    const int64_t blocks = nl / 8;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lane = lane0 + 8 * b;
      simd[b].init(x + 8 * b, centre + 8 * b, rows_anchor + lane, rows_delta + lane, sym_base);
    }
#else
    constexpr int64_t blocks = 0;
#endif
    for (int64_t t = 0; t < T; ++t) {
      const bool delta = sel[t] != 0;
      const uint8_t* const* lut = delta ? lut_d : lut_a;
      const uint32_t* const* fc = delta ? fc_d : fc_a;
#if defined(__AVX2__)
      for (int64_t b = 0; b < blocks; ++b)
        ptr = simd[b].step<LOCALITY>(delta, sym_lut, freq_cum, words, ptr, sym + 8 * b);
#endif
      for (int64_t i = 8 * blocks; i < nl; ++i) {
        const uint32_t slot = x[i] & kMask;
        int32_t s = lut[i][slot];
        const uint32_t fcv = fc[i][s];
        const uint32_t st = (fcv & 0xFFFF) * (x[i] >> kProbBits) + slot - (fcv >> 16);
        // Branch-free renormalisation (a taken/not-taken pattern near 20/80 mispredicts): always load
        // the next word (an over-read leaves ptr != end, caught after the group).
        const uint32_t need = st < kRansL;
        const uint32_t w = words[ptr];  // the caller pads words by 64 * T + 8: an over-read stays in bounds
        x[i] = need ? (st << 16) | w : st;
        ptr += need;
        if constexpr (LOCALITY) {
          if (!delta) {
            anchor[i] = s;
          } else {
            const int32_t n = 2 * centre[i] + 1;
            s += anchor[i] - centre[i];
            s = s >= n ? s - n : (s < 0 ? s + n : s);
          }
        }
        sym[i] = s - centre[i];
      }
      // Dequantise apart from the rANS chain: in the usual group (one row, 64 consecutive channels)
      // this loop has one step and contiguous stores, so the compiler vectorises it.
      if (placed != nullptr) {
        if (t < placed->t0 || t >= placed->t1) continue;
        if (one_row) {
          auto* to = writer.target(t, reinterpret_cast<typename RowWriter<OUT_KIND>::Elem*>(values));
          if (t < placed->exact_tokens) {
            writer.copy_exact(t, to);
          } else {
#if defined(__AVX2__)
            store_row8<OUT_KIND>(sym, nl, step[rowt[0] + t], limit, to, 0);
#else
            store_row<OUT_KIND>(sym, nl, step[rowt[0] + t], limit, to, 0);
#endif
          }
          writer.commit(t, to);
        } else {
          for (int64_t i = 0; i < nl; ++i) {
            store_row<OUT_KIND>(sym + i, 1, step[rowt[i] + t], limit, values, 0);
            place_row<OUT_KIND>(*placed, values, rowt[i] / T, t, obase[i] % K, 1, T, K);
          }
        }
      } else if (one_row) {
        const float st = step[rowt[0] + t];
#if defined(__AVX2__)
        store_row8<OUT_KIND>(sym, nl, st, limit, out, obase[0] + t * K);
#else
        store_row<OUT_KIND>(sym, nl, st, limit, out, obase[0] + t * K);
#endif
      } else {
        for (int64_t i = 0; i < nl; ++i)
          store_row<OUT_KIND>(sym + i, 1, step[rowt[i] + t], limit, out, obase[i] + t * K);
      }
    }
    if (placed != nullptr && one_row) writer.flush();
    if (ptr != end) return 1;
#if defined(__AVX2__)
    for (int64_t b = 0; b < blocks; ++b) simd[b].store_state(x + 8 * b);
#endif
    for (int64_t i = 0; i < nl; ++i)
      if (x[i] != kRansL) return 1;
  }
  return 0;
}

}  // namespace

extern "C" {

// bf16 bits of max|x| per row of K values, rounded up (in_kind 0: float32, 1: bfloat16). 1 on NaN/inf.
int cg_scales(const void* x, int in_kind, int64_t rows, int64_t K, int32_t* bits_out) {
  return in_kind == 1 ? scales<1>(x, rows, K, bits_out) : scales<0>(x, rows, K, bits_out);
}

// Symbols round(x / step) + C clamped to [0, 2C] for x [R, T, K], and each lane's (r, k) exact moments of
// the centred symbols over all tokens (the locality-off path; quant.py is the reference).
void cg_quantize(const void* x, int in_kind, int64_t R, int64_t T, int64_t K, const int64_t* half,
                 const float* step, uint8_t* sym, int64_t* s1, int64_t* s2) {
  if (in_kind == 1) quantize<1>(x, R, T, K, half, step, sym, s1, s2);
  else quantize<0>(x, R, T, K, half, step, sym, s1, s2);
}

// Encode lane groups [g0, g1). sym: uint8 [R, T, K] (locality applied); lane = r * K + k.
// fc_anchor / fc_delta: offset of each lane's table row in freq / cum / rcp; sel[t]: 1 -> delta table.
// Each group's words go right-aligned into scratch[g * 64 * T ...]; counts[g] says how many.
void cg_encode(const uint8_t* sym, int64_t R, int64_t T, int64_t K, const int64_t* fc_anchor,
               const int64_t* fc_delta, const uint8_t* sel, const uint32_t* freq, const uint32_t* cum,
               const uint64_t* rcp, int64_t g0, int64_t g1, uint16_t* scratch, uint32_t* states,
               uint32_t* counts) {
  const int64_t lanes = R * K, cap = kGroup * T;
  uint32_t x[kGroup];
  int64_t base[kGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t lane0 = g * kGroup;
    const int64_t nl = lanes - lane0 < kGroup ? lanes - lane0 : kGroup;
    for (int64_t i = 0; i < nl; ++i) {
      const int64_t lane = lane0 + i;
      x[i] = kRansL;
      base[i] = (lane / K) * T * K + lane % K;
    }
    uint16_t* out = scratch + g * cap;
    int64_t pos = cap;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t* fc = sel[t] ? fc_delta : fc_anchor;
      for (int64_t i = nl - 1; i >= 0; --i) {
        const int64_t off = fc[lane0 + i] + sym[base[i] + t * K];
        const uint32_t f = freq[off];
        uint32_t s = x[i];
        if ((s >> kRenormShift) >= f) {
          out[--pos] = static_cast<uint16_t>(s & 0xFFFF);
          s >>= 16;
        }
        const uint32_t q = static_cast<uint32_t>((static_cast<unsigned __int128>(s) * rcp[off]) >> 43);
        x[i] = (q << kProbBits) + (s - q * f) + cum[off];
      }
    }
    for (int64_t i = 0; i < nl; ++i) states[lane0 + i] = x[i];
    counts[g] = static_cast<uint32_t>(cap - pos);
  }
}

// Concatenate the right-aligned group streams of cg_encode: words[offsets[g] ...] for g in [g0, g1).
void cg_pack(const uint16_t* scratch, int64_t T, const uint32_t* counts, const int64_t* offsets, int64_t g0,
             int64_t g1, uint16_t* words) {
  const int64_t cap = kGroup * T;
  for (int64_t g = g0; g < g1; ++g)
    std::memcpy(words + offsets[g], scratch + g * cap + cap - counts[g], sizeof(uint16_t) * counts[g]);
}

// Decode lane groups [g0, g1) into out [R, T, K] (out_kind 0: float32, 1: bfloat16), undoing token-wise
// locality (group size `locality`, <= 1 off) and dequantising (sym - C) * step[r, t]. rows_*: each lane's
// global table row; sym_base[row]: the row's offset in freq_cum. offsets: int64 [groups + 1] into words.
// Returns 0, or 1 if a stream is corrupt (over-read, bad initial or final state, words left over).
// `placement`: null (write into `out`), or eight int64s, the Placement's fields in order (row, token and
// channel: addresses of int64 arrays; exact: the address of the exact tokens); then `out` is unused.
int cg_decode_placed(const uint16_t* words, const int64_t* offsets, const uint32_t* states,
                     const int64_t* rows_anchor, const int64_t* rows_delta, const int64_t* sym_base,
                     const uint8_t* sel, const uint8_t* sym_lut, const uint32_t* freq_cum, const int64_t* half,
                     const float* step, int64_t R, int64_t T, int64_t K, int64_t locality, int64_t g0, int64_t g1,
                     void* out, int out_kind, const int64_t* placement) {
  Placement pl{};
  const Placement* placed = nullptr;
  if (placement != nullptr) {
    pl = Placement{reinterpret_cast<const int64_t*>(placement[0]), reinterpret_cast<const int64_t*>(placement[1]),
                   reinterpret_cast<const int64_t*>(placement[2]), placement[3], placement[4], placement[5],
                   reinterpret_cast<const void*>(placement[6]), placement[7]};
    if (pl.layers <= 0 || R % pl.layers != 0) return 1;
    placed = &pl;
  }
#define CG_DECODE(KIND, LOC)                                                                                \
  decode<KIND, LOC>(words, offsets, states, rows_anchor, rows_delta, sym_base, sel, sym_lut, freq_cum, half, \
                    step, R, T, K, g0, g1, out, placed)
  const bool loc = locality > 1;
  const int result = out_kind == 1 ? (loc ? CG_DECODE(1, true) : CG_DECODE(1, false))
                                   : (loc ? CG_DECODE(0, true) : CG_DECODE(0, false));
#undef CG_DECODE
#if defined(__SSE2__)
  if (placed != nullptr) _mm_sfence();  // RowWriter's streamed stores are visible once this returns, either way
#endif
  return result;
}

// cg_decode_placed into `out`.
int cg_decode(const uint16_t* words, const int64_t* offsets, const uint32_t* states, const int64_t* rows_anchor,
              const int64_t* rows_delta, const int64_t* sym_base, const uint8_t* sel, const uint8_t* sym_lut,
              const uint32_t* freq_cum, const int64_t* half, const float* step, int64_t R, int64_t T, int64_t K,
              int64_t locality, int64_t g0, int64_t g1, void* out, int out_kind) {
  return cg_decode_placed(words, offsets, states, rows_anchor, rows_delta, sym_base, sel, sym_lut, freq_cum, half,
                          step, R, T, K, locality, g0, g1, out, out_kind, nullptr);
}

}  // extern "C"
