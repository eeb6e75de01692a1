/* CPU gather/scatter of token KV between vLLM's paged layers and a canonical chunk.
 *
 * Plain C + OpenMP, loaded with ctypes (see cpu_fast.py), so building it takes a second and needs
 * no torch headers. It links libgomp.so.1, which resolves to the copy torch already loaded: one
 * OpenMP thread pool for both.
 *
 * Work is split into (layer, run) items, a run being consecutive slots inside one block. Inside a
 * run, a token's head row is a contiguous D-element copy for the plain layout and V of the CPU
 * "vec" packing; K of "vec" is stored transposed ([D, N]) and is copied through small tiles; the
 * "amx" tiles are addressed element by element from their formulas. Arguments were validated in
 * Python (shapes, strides, slot range) before this is called.
 *
 * kv_scatter_verified also hashes the chunk as it copies it: a thread takes one layer, hashes its K
 * and V slabs (the payload checksum's segments, serde/header.py) with the xxh3 function it is
 * given, then copies that layer from its cache-hot bytes. Each byte is read from memory once, and
 * the checksum runs on every copy thread instead of before the copy on one.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_SSE2 1
#else
#define HAVE_SSE2 0
#endif

enum { PACK_PLAIN = 0, PACK_VEC = 1, PACK_AMX = 2 };

typedef struct {
    int64_t num_layers, num_tokens, num_heads, block_size, head_size, num_kv, elem_size, packing;
    const int64_t *layer_addrs; /* byte address of element [0, 0, 0, 0] of each layer */
    const int64_t *slots;
    int64_t layer_stride_block, layer_stride_head, layer_stride_token; /* elements */
    int64_t chunk_addr;
    int64_t chunk_stride_kv, chunk_stride_layer, chunk_stride_token, chunk_stride_head; /* elements */
    int64_t num_slots; /* num_blocks * block_size: slots must lie in [0, num_slots) */
    int64_t streaming; /* 1: non-temporal stores for aligned rows (no read-for-ownership of the target) */
} KVArgs;

typedef struct {
    int64_t first_token, length, block, offset;
} Run;

/* Consecutive slots in one block become one run. Returns the number of runs, or -1 - t if slot t
 * is outside [0, limit) (checked for every slot before anything is copied). */
static int64_t find_runs(const KVArgs *a, Run *runs) {
    int64_t count = 0;
    for (int64_t t = 0; t < a->num_tokens; t++) {
        int64_t slot = a->slots[t];
        if (slot < 0 || slot >= a->num_slots) return -1 - t;
        int64_t block = slot / a->block_size, offset = slot % a->block_size;
        if (count > 0) {
            Run *last = &runs[count - 1];
            if (last->block == block && last->offset + last->length == offset) {
                last->length++;
                continue;
            }
        }
        runs[count].first_token = t;
        runs[count].length = 1;
        runs[count].block = block;
        runs[count].offset = offset;
        count++;
    }
    return count;
}

/* One row copy. Streaming (non-temporal) stores skip reading the target lines before writing
 * them, a third of the memory traffic of a gather; they need 16-byte aligned rows. Fixed sizes let
 * the compiler inline the usual head sizes otherwise. */
static inline void copy_row(char *dst, const char *src, int64_t bytes, int64_t streaming) {
#if HAVE_SSE2
    if (streaming && ((((uintptr_t)dst) | (uintptr_t)bytes) & 15) == 0) {
        for (int64_t i = 0; i < bytes; i += 16)
            _mm_stream_si128((__m128i *)(dst + i), _mm_loadu_si128((const __m128i *)(src + i)));
        return;
    }
#endif
    switch (bytes) {
    case 64: memcpy(dst, src, 64); break;
    case 128: memcpy(dst, src, 128); break;
    case 256: memcpy(dst, src, 256); break;
    case 512: memcpy(dst, src, 512); break;
    default: memcpy(dst, src, (size_t)bytes);
    }
}

/* b[c * sb + r] = a[r * sa + c] for a rows x cols matrix: the K of the "vec" packing is stored
 * transposed ([D, N]), so gather transposes region -> chunk rows and scatter the reverse. Full 8x8
 * (2-byte) and 4x4 (4-byte) tiles use SSE2 shuffles; edges and other widths go element by element. */
#define TILE 16
/* Copies the elements outside the [0, r_full) x [0, c_full) block that the SIMD tiles covered. */
#define DEFINE_EDGE_TRANSPOSE(TYPE)                                                                  \
    static void transpose_edges_##TYPE(const TYPE *a, int64_t sa, TYPE *b, int64_t sb, int64_t rows,   \
                                       int64_t cols, int64_t r_full, int64_t c_full) {             \
        for (int64_t r0 = 0; r0 < rows; r0 += TILE) {                                               \
            int64_t r1 = r0 + TILE < rows ? r0 + TILE : rows;                                       \
            for (int64_t c = 0; c < cols; c++)                                                      \
                for (int64_t r = r0; r < r1; r++)                                                   \
                    if (r >= r_full || c >= c_full) b[c * sb + r] = a[r * sa + c];                  \
        }                                                                                           \
    }

DEFINE_EDGE_TRANSPOSE(uint8_t)
DEFINE_EDGE_TRANSPOSE(uint16_t)
DEFINE_EDGE_TRANSPOSE(uint32_t)
DEFINE_EDGE_TRANSPOSE(uint64_t)

#if HAVE_SSE2
static inline void store16(int stream, __m128i *dst, __m128i value) {
    if (stream) _mm_stream_si128(dst, value);
    else _mm_storeu_si128(dst, value);
}

static inline void tile8x8_u16(const uint16_t *a, int64_t sa, uint16_t *b, int64_t sb, int stream) {
    __m128i r0 = _mm_loadu_si128((const __m128i *)(a + 0 * sa)), r1 = _mm_loadu_si128((const __m128i *)(a + 1 * sa));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(a + 2 * sa)), r3 = _mm_loadu_si128((const __m128i *)(a + 3 * sa));
    __m128i r4 = _mm_loadu_si128((const __m128i *)(a + 4 * sa)), r5 = _mm_loadu_si128((const __m128i *)(a + 5 * sa));
    __m128i r6 = _mm_loadu_si128((const __m128i *)(a + 6 * sa)), r7 = _mm_loadu_si128((const __m128i *)(a + 7 * sa));
    __m128i t0 = _mm_unpacklo_epi16(r0, r1), t1 = _mm_unpackhi_epi16(r0, r1);
    __m128i t2 = _mm_unpacklo_epi16(r2, r3), t3 = _mm_unpackhi_epi16(r2, r3);
    __m128i t4 = _mm_unpacklo_epi16(r4, r5), t5 = _mm_unpackhi_epi16(r4, r5);
    __m128i t6 = _mm_unpacklo_epi16(r6, r7), t7 = _mm_unpackhi_epi16(r6, r7);
    __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
    __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
    __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
    __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
    store16(stream, (__m128i *)(b + 0 * sb), _mm_unpacklo_epi64(u0, u4));
    store16(stream, (__m128i *)(b + 1 * sb), _mm_unpackhi_epi64(u0, u4));
    store16(stream, (__m128i *)(b + 2 * sb), _mm_unpacklo_epi64(u1, u5));
    store16(stream, (__m128i *)(b + 3 * sb), _mm_unpackhi_epi64(u1, u5));
    store16(stream, (__m128i *)(b + 4 * sb), _mm_unpacklo_epi64(u2, u6));
    store16(stream, (__m128i *)(b + 5 * sb), _mm_unpackhi_epi64(u2, u6));
    store16(stream, (__m128i *)(b + 6 * sb), _mm_unpacklo_epi64(u3, u7));
    store16(stream, (__m128i *)(b + 7 * sb), _mm_unpackhi_epi64(u3, u7));
}

static inline void tile4x4_u32(const uint32_t *a, int64_t sa, uint32_t *b, int64_t sb, int stream) {
    __m128i r0 = _mm_loadu_si128((const __m128i *)(a + 0 * sa)), r1 = _mm_loadu_si128((const __m128i *)(a + 1 * sa));
    __m128i r2 = _mm_loadu_si128((const __m128i *)(a + 2 * sa)), r3 = _mm_loadu_si128((const __m128i *)(a + 3 * sa));
    __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpackhi_epi32(r0, r1);
    __m128i t2 = _mm_unpacklo_epi32(r2, r3), t3 = _mm_unpackhi_epi32(r2, r3);
    store16(stream, (__m128i *)(b + 0 * sb), _mm_unpacklo_epi64(t0, t2));
    store16(stream, (__m128i *)(b + 1 * sb), _mm_unpackhi_epi64(t0, t2));
    store16(stream, (__m128i *)(b + 2 * sb), _mm_unpacklo_epi64(t1, t3));
    store16(stream, (__m128i *)(b + 3 * sb), _mm_unpackhi_epi64(t1, t3));
}
#define SIMD_TILES 1
#else
#define SIMD_TILES 0
#endif

static void transpose(int64_t elem_size, const char *a, int64_t sa, char *b, int64_t sb, int64_t rows, int64_t cols,
                      int64_t streaming) {
    int64_t r_full = 0, c_full = 0;
#if HAVE_SSE2
    if (elem_size == 2 || elem_size == 4) {
        const int64_t t = elem_size == 2 ? 8 : 4;
        const int stream = streaming && ((uintptr_t)b & 15) == 0 && ((sb * elem_size) & 15) == 0;
        r_full = rows / t * t;
        c_full = cols / t * t;
        /* Source rows outer: the source (memory) is read as t sequential streams while the target
         * (an L1-sized scratch) takes the scattered 16-byte stores. */
        for (int64_t r = 0; r < r_full; r += t)
            for (int64_t c = 0; c < c_full; c += t) {
                if (elem_size == 2)
                    tile8x8_u16((const uint16_t *)a + r * sa + c, sa, (uint16_t *)b + c * sb + r, sb, stream);
                else
                    tile4x4_u32((const uint32_t *)a + r * sa + c, sa, (uint32_t *)b + c * sb + r, sb, stream);
            }
    }
#endif
    if (r_full == rows && c_full == cols) return;
    switch (elem_size) {
    case 1: transpose_edges_uint8_t((const uint8_t *)a, sa, (uint8_t *)b, sb, rows, cols, r_full, c_full); break;
    case 2: transpose_edges_uint16_t((const uint16_t *)a, sa, (uint16_t *)b, sb, rows, cols, r_full, c_full); break;
    case 4: transpose_edges_uint32_t((const uint32_t *)a, sa, (uint32_t *)b, sb, rows, cols, r_full, c_full); break;
    default: transpose_edges_uint64_t((const uint64_t *)a, sa, (uint64_t *)b, sb, rows, cols, r_full, c_full); break;
    }
}

/* Element offset inside a (block, head) region of the "amx" packing (2-byte elements). */
static inline int64_t amx_offset(int64_t kv, int64_t o, int64_t d, int64_t n, int64_t d_size) {
    if (kv == 0) return (o / 16) * 16 * d_size + (d / 2) * 32 + (o % 16) * 2 + d % 2;
    return n * d_size + (d / 16) * 16 * n + (o / 2) * 32 + (d % 16) * 2 + o % 2;
}

/* Plain layout: each (token, head) holds K then V rows of D elements. Walk tokens and heads in the
 * order the cache stores them (heads inside tokens for the *NHC layouts), so reads stay sequential. */
static void copy_plain(const KVArgs *a, char *block_base, char *chunk_first, const Run *run, int gather) {
    const int64_t es = a->elem_size, row_bytes = a->head_size * es;
    /* Reads sequential: the cache's order when gathering, the chunk's (heads inside tokens) when scattering. */
    const int heads_inner = !gather || a->layer_stride_head < a->layer_stride_token;
    const int64_t outer_count = heads_inner ? run->length : a->num_heads;
    const int64_t inner_count = heads_inner ? a->num_heads : run->length;
    const int64_t cache_outer = (heads_inner ? a->layer_stride_token : a->layer_stride_head) * es;
    const int64_t cache_inner = (heads_inner ? a->layer_stride_head : a->layer_stride_token) * es;
    const int64_t chunk_outer = (heads_inner ? a->chunk_stride_token : a->chunk_stride_head) * es;
    const int64_t chunk_inner = (heads_inner ? a->chunk_stride_head : a->chunk_stride_token) * es;
    const int64_t chunk_kv = a->chunk_stride_kv * es;
    char *cache_first = block_base + run->offset * a->layer_stride_token * es;
    for (int64_t i = 0; i < outer_count; i++) {
        for (int64_t j = 0; j < inner_count; j++) {
            char *cache_row = cache_first + i * cache_outer + j * cache_inner;
            char *chunk_row = chunk_first + i * chunk_outer + j * chunk_inner;
            for (int64_t kv = 0; kv < a->num_kv; kv++) {
                if (gather) copy_row(chunk_row + kv * chunk_kv, cache_row + kv * row_bytes, row_bytes, a->streaming);
                else copy_row(cache_row + kv * row_bytes, chunk_row + kv * chunk_kv, row_bytes, a->streaming);
            }
        }
    }
}

/* The "vec" packing. K is stored transposed ([D, N] per head), so it goes through a scratch of all
 * heads' K for the run (cache-sized): the cache side is read or written as whole region rows, the
 * chunk side token by token across heads (its own order), with streaming stores to memory. V is
 * plain rows, copied token-major too. */
static void copy_vec_packed(const KVArgs *a, char *block_base, char *chunk_first, const Run *run, int gather,
                            char *scratch) {
    const int64_t es = a->elem_size, n = a->block_size, d_size = a->head_size, heads = a->num_heads;
    const int64_t row_bytes = d_size * es, length = run->length;
    const int64_t token_step = a->chunk_stride_token * es, head_step = a->chunk_stride_head * es;
    const int64_t region_step = a->layer_stride_head * es, scratch_step = length * row_bytes;
    char *chunk_values = chunk_first + a->chunk_stride_kv * es;
    char *values = block_base + n * row_bytes + run->offset * row_bytes; /* V row `offset` of head 0 */
    if (gather) {
        for (int64_t h = 0; h < heads; h++) /* region [D, N] columns offset.. -> scratch_h [length, D] */
            transpose(es, block_base + h * region_step + run->offset * es, n, scratch + h * scratch_step, d_size,
                      d_size, length, 0);
        for (int64_t j = 0; j < length; j++)
            for (int64_t h = 0; h < heads; h++)
                copy_row(chunk_first + j * token_step + h * head_step, scratch + h * scratch_step + j * row_bytes,
                         row_bytes, a->streaming);
        for (int64_t j = 0; j < length; j++)
            for (int64_t h = 0; h < heads; h++)
                copy_row(chunk_values + j * token_step + h * head_step, values + h * region_step + j * row_bytes,
                         row_bytes, a->streaming);
        return;
    }
    for (int64_t j0 = 0; j0 < length; j0 += 8) { /* 8 chunk tokens at a time -> scratch_h [D, length] */
        const int64_t rows = length - j0 < 8 ? length - j0 : 8;
        for (int64_t h = 0; h < heads; h++)
            transpose(es, chunk_first + j0 * token_step + h * head_step, a->chunk_stride_token,
                      scratch + h * scratch_step + j0 * es, length, rows, d_size, 0);
    }
    for (int64_t h = 0; h < heads; h++) {
        char *keys = block_base + h * region_step + run->offset * es; /* column `offset` of [D, N] */
        for (int64_t d = 0; d < d_size; d++)
            copy_row(keys + d * n * es, scratch + h * scratch_step + d * length * es, length * es, a->streaming);
    }
    for (int64_t j = 0; j < length; j++)
        for (int64_t h = 0; h < heads; h++)
            copy_row(values + h * region_step + j * row_bytes, chunk_values + j * token_step + h * head_step,
                     row_bytes, a->streaming);
}

/* The "amx" packing: K and V tiled in 16/2-element groups; element by element from the formulas
 * (correctness over speed: only AMX machines use it, and this project has none to tune on). */
static void copy_amx_packed(const KVArgs *a, char *block_base, char *chunk_first, const Run *run, int gather) {
    const int64_t es = a->elem_size, n = a->block_size, d_size = a->head_size;
    for (int64_t h = 0; h < a->num_heads; h++) {
        uint16_t *region = (uint16_t *)(block_base + h * a->layer_stride_head * es);
        for (int64_t kv = 0; kv < 2; kv++) {
            for (int64_t j = 0; j < run->length; j++) {
                uint16_t *row = (uint16_t *)(chunk_first + (kv * a->chunk_stride_kv + j * a->chunk_stride_token +
                                                            h * a->chunk_stride_head) * es);
                const int64_t o = run->offset + j;
                for (int64_t d = 0; d < d_size; d++) {
                    uint16_t *cell = region + amx_offset(kv, o, d, n, d_size);
                    if (gather) row[d] = *cell;
                    else *cell = row[d];
                }
            }
        }
    }
}

static void copy_item(const KVArgs *a, int64_t layer, const Run *run, int gather, char *scratch) {
    const int64_t es = a->elem_size;
    char *layer_base = (char *)(intptr_t)a->layer_addrs[layer];
    char *block_base = layer_base + run->block * a->layer_stride_block * es;
    char *chunk_first = (char *)(intptr_t)a->chunk_addr +
                        (layer * a->chunk_stride_layer + run->first_token * a->chunk_stride_token) * es;
    if (a->packing == PACK_PLAIN) copy_plain(a, block_base, chunk_first, run, gather);
    else if (a->packing == PACK_VEC) copy_vec_packed(a, block_base, chunk_first, run, gather, scratch);
    else copy_amx_packed(a, block_base, chunk_first, run, gather);
}

/* The xxh3-64 function (XXH3_64bits), passed in so this library links nothing beyond libgomp. */
typedef uint64_t (*HashFn)(const void *data, size_t length);

/* Returns 0 on success, -1 if memory could not be allocated, 1 + t if slot t is out of range
 * (then nothing was written). With ``hash``, a scatter of a whole contiguous chunk also writes the
 * digest of each (kv, layer) slab to digests[kv * num_layers + layer], one layer per work item. */
static int64_t run_copy(const KVArgs *a, int num_threads, int gather, HashFn hash, uint64_t *digests) {
    if (a->num_tokens == 0) return 0;
    Run *runs = (Run *)malloc(sizeof(Run) * (size_t)a->num_tokens);
    if (!runs) return -1;
    const int64_t num_runs = find_runs(a, runs);
    if (num_runs < 0) {
        free(runs);
        return -num_runs;
    }
    /* Hashing: one item per layer (its slabs hashed, then all its runs copied from the cache). */
    const int64_t items = hash ? a->num_layers : num_runs * a->num_layers;
    const int64_t slab_bytes = a->chunk_stride_layer * a->elem_size;
    /* At least ~1 MiB per thread: waking a thread costs more than copying less. */
    const int64_t bytes = a->num_layers * a->num_tokens * a->num_heads * a->num_kv * a->head_size * a->elem_size;
    int64_t threads = bytes >> 20;
    if (threads > num_threads) threads = num_threads;
    if (threads > items) threads = items;
    if (threads < 1) threads = 1;
    const size_t scratch_bytes =
        a->packing == PACK_VEC ? (size_t)(a->num_heads * a->block_size * a->head_size * a->elem_size + 64) : 0;
    int failed = 0;
#pragma omp parallel num_threads((int)threads) if (threads > 1) reduction(| : failed)
    {
        char *scratch = scratch_bytes ? (char *)malloc(scratch_bytes) : NULL;
        if (scratch_bytes && !scratch) {
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (scratch_bytes && !scratch) continue;
            char *aligned = scratch ? (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63) : NULL;
            if (!hash) {
                copy_item(a, item / num_runs, &runs[item % num_runs], gather, aligned);
                continue;
            }
            for (int64_t kv = 0; kv < a->num_kv; kv++) {
                const char *slab = (const char *)(intptr_t)a->chunk_addr +
                                   (kv * a->chunk_stride_kv + item * a->chunk_stride_layer) * a->elem_size;
                digests[kv * a->num_layers + item] = hash(slab, (size_t)slab_bytes);
            }
            for (int64_t r = 0; r < num_runs; r++) copy_item(a, item, &runs[r], gather, aligned);
        }
#if HAVE_SSE2
        _mm_sfence(); /* streaming stores become visible before the caller reads the target */
#endif
        free(scratch);
    }
    free(runs);
    return failed ? -1 : 0;
}

int64_t kv_gather(const KVArgs *args, int num_threads) { return run_copy(args, num_threads, 1, NULL, NULL); }

int64_t kv_scatter(const KVArgs *args, int num_threads) { return run_copy(args, num_threads, 0, NULL, NULL); }

/* The chunk must be contiguous ([num_kv, num_layers, tokens, heads, head_size], every token of it
 * scattered): its slabs are then consecutive segments of chunk_stride_layer elements. */
int64_t kv_scatter_verified(const KVArgs *args, int num_threads, HashFn hash, uint64_t *digests) {
    if (!hash || !digests) return -1;
    return run_copy(args, num_threads, 0, hash, digests);
}

/* Hash each ``segment``-byte piece of ``src`` (the last may be shorter) into digests[piece] and, with
 * ``dst``, copy the piece there right after, while it is still in cache: a verify that stages a chunk
 * for a GPU copy reads each byte from memory once. Pieces are shared among up to ``num_threads``
 * threads (at least ~1 MiB each). Returns 0, or -1 for bad arguments. */
int64_t kv_hash_copy(const char *src, char *dst, int64_t nbytes, int64_t segment, int num_threads, HashFn hash,
                     uint64_t *digests) {
    if (!src || !hash || !digests || nbytes < 0 || segment <= 0) return -1;
    const int64_t pieces = (nbytes + segment - 1) / segment;
    int64_t threads = nbytes >> 20;
    if (threads > num_threads) threads = num_threads;
    if (threads > pieces) threads = pieces;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads((int)threads) if (threads > 1) schedule(dynamic, 1)
    for (int64_t piece = 0; piece < pieces; piece++) {
        const int64_t start = piece * segment;
        const int64_t length = nbytes - start < segment ? nbytes - start : segment;
        digests[piece] = hash(src + start, (size_t)length);
        if (dst) memcpy(dst + start, src + start, (size_t)length);
    }
    return 0;
}

int kv_abi_version(void) { return 4; }
