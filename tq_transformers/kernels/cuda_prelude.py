"""CUDA C++ prelude of the split decode kernels (``cuda_source``: codebook keys and values; ``cuda_affine_source``:
KIVI), one home for what both share: defines, load / convert / mma helpers, the byte-table lookup and the fragment
decoders, the query fragments, the key scores, the online softmax, the value accumulation, the tile loop and the
partials.

Placeholders ``__D__`` (head_dim), ``__KB__`` / ``__VB__`` (key / value bits), ``__NWARPS__``, ``__BF16__``,
``__CHAINS__``, ``__LAZY__``, ``__DEPTH__``, ``__MINB__``, ``__SHARED__`` are filled by ``cuda_split._source``
(``CUDA_PLAN``). The layouts are explained in ``cuda_split``'s docstring.
"""

PRELUDE = r"""
#define D __D__
#define KB __KB__
#define VB __VB__
#define NWARPS __NWARPS__
#define IS_BF16 __BF16__
#define TWO_CHAINS __CHAINS__     /* the key mma steps as two independent accumulation chains */
#define LAZY_RESCALE __LAZY__     /* rescale the output accumulators only in tiles where a running max moved */
#define DEPTH __DEPTH__           /* tiles loaded ahead of the one decoded (1 or 2) */
#define MIN_BLOCKS __MINB__       /* __launch_bounds__ blocks per SM (0: no register cap) */
#define SHARED_TABLE __SHARED__   /* one table for both sides, theirs being equal (cuda_split._shared_table) */
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define KWORDS (4 / KB)           /* 32-bit words (code pairs) a key byte decodes to */
#define VWORDS (4 / VB)
#define KREPL (32 / KWORDS)       /* table copies: one per lane of a conflict-free phase */
#define VREPL (32 / VWORDS)
#define SIDE_BYTES 128            /* one side's copies of one entry: REPL * WORDS words */
#if SHARED_TABLE
#if KB != VB
#error "a shared table needs keys and values of one width"
#endif
#define ENTRY_BYTES SIDE_BYTES    /* shared-memory bytes of one byte value: [copy][word], both sides' lookups */
#else
#define ENTRY_BYTES 256           /* shared-memory bytes of one byte value: [side (key, value)][copy][word] */
#endif
#define TABLE_BYTES (256 * ENTRY_BYTES)
#define TILE 16                   /* tokens a tile: the mma's M (keys) and K (values) */
#define KBYTES (D * KB / 32)      /* key bytes a lane reads per token: D/4 codes */
#define VBYTES (D * VB / 64)      /* value bytes a lane reads per token: D/8 codes */
#define KROW (D * KB / 8)         /* bytes of one token's key codes (rows back to back: cuda_split._pair_fits) */
#define VROW (D * VB / 8)
#define VREGS (D / 16)            /* value code pairs a lane holds per token = m-tiles */
#define KSTEPS (D / 16)
#define NEG_INF (__int_as_float(0xff800000))

template <bool GLOBAL, class T>
__device__ __forceinline__ T load1(const T* p) { return GLOBAL ? __ldg(p) : *p; }  /* read-only global, or shared */

/* nbytes (1 .. 32) at p into the 32-bit words w, in the widest loads they allow: from global memory (GLOBAL, through
   the read-only path) or shared memory */
template <bool GLOBAL>
__device__ __forceinline__ void load_words(const u8* p, u32* w, int nbytes) {
    if (nbytes == 32) {
        const uint4 a = load1<GLOBAL>((const uint4*)p), b = load1<GLOBAL>((const uint4*)(p + 16));
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if (nbytes == 16) {
        const uint4 a = load1<GLOBAL>((const uint4*)p); w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    } else if (nbytes == 8) { const uint2 a = load1<GLOBAL>((const uint2*)p); w[0] = a.x; w[1] = a.y; }
    else if (nbytes == 4) { w[0] = load1<GLOBAL>((const u32*)p); }
    else if (nbytes == 2) { w[0] = load1<GLOBAL>((const u16*)p); }
    else { w[0] = load1<GLOBAL>(p); }
}
__device__ __forceinline__ void load_bytes(const u8* p, u32* w, int nbytes) { load_words<true>(p, w, nbytes); }
__device__ __forceinline__ void load_shared(const u8* p, u32* w, int nbytes) { load_words<false>(p, w, nbytes); }

__device__ __forceinline__ float half_to_float(u16 h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if IS_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 s) {
    u32 r; asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s)); return r;
}
__device__ __forceinline__ u32 transpose8x8(u32 x) {
    u32 r; asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x)); return r;
}
__device__ __forceinline__ float fast_exp2(float x) {
    float r; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x)); return r;
}
template <bool BF>  /* c += A B, operands bf16 (BF) or fp16 */
__device__ __forceinline__ void mma_t(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    if (BF)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {  /* model dtype */
    mma_t<IS_BF16>(c, a0, a1, a2, a3, b0, b1);
}

/* The entry of byte j (0..3) of `idx` (WORDS words) into dst[0 .. WORDS-1]: the entry starts at byte * ENTRY_BYTES,
   so its offset is one byte-permute writing the byte into bits 8..15 of `base` (this lane's copy on its side, < 256;
   cuda_split's docstring draws the layout). With the shared table (128-byte entries, base < 128: both sides' copy)
   the byte goes to bits 7..14: one byte-permute zero-extending it, then byte * 128 + base, which ptxas makes an IMAD
   (or LEA): one op more a lookup, on the FMA pipe beside the ALU's PRMTs. Offline SASS of the tile loop at D = 128,
   4 bits, 8 warps, ring 3 (scripts/inspect_cuda_sass.py, 2026-12-03; 64 lookups): this form +66; a plain C shift
   and mask +80 (ptxas folds the mask into the interleave's LOP3s, split by byte); an asm shift + LOP3 +66; a PRMT
   + shift +63, but 254 registers at D = 256 against this form's 233 */
template <int WORDS>
__device__ __forceinline__ void lookup(u32 idx, int j, const u8* table, u32 base, u32* dst) {
#if SHARED_TABLE
    const u32 off = (prmt(idx, 0, 0x4440 + j) << 7) | base;  /* idx.byte(j), 0, 0, 0: then one IMAD / LEA */
#else
    const u32 off = prmt(base, idx, 0x3240 + 0x10 * j);  /* base.b0, idx.byte(j), 0, 0 */
#endif
    const u8* e = table + off;
    if (WORDS == 1) { dst[0] = *(const u32*)e; }
    else if (WORDS == 2) { const uint2 v = *(const uint2*)e; dst[0] = v.x; dst[1] = v.y; }
    else { const uint4 v = *(const uint4*)e; dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w; }
}

/* Two tokens' code words interleaved field by field (fields of F bits): lo = a's even fields, b's even fields
   moved up one field; hi = a's odd fields moved down, b's odd fields. Two ops each. */
template <int F>
__device__ __forceinline__ void interleave(u32 a, u32 b, u32& lo, u32& hi) {
    constexpr u32 EVEN = F == 4 ? 0x0f0f0f0fu : 0x33333333u;
    lo = (a & EVEN) | ((b << F) & ~EVEN);
    hi = ((a >> F) & EVEN) | (b & ~EVEN);
}

/* The key mma's A fragments ka[kk] = (a0, a1, a2, a3) of S^T = K Q^T, step kk: rows gid (token w0) and gid + 8
   (token w1), each lookup landing in its fragment register (no register moves). Index bytes, by key bits:
     4: a byte of one token (one word: coordinates 2 of them);
     2: interleave<4>: [w0 c0 c1 | w1 c0 c1] -> (a0, a1), [w0 c2 c3 | w1 c2 c3] -> (a2, a3);
     1: interleave<2>: [w0 c0c1 | w1 c0c1 | w0 c4c5 | w1 c4c5] -> a quad, [.. c2c3 .. c6c7 ..] -> the next step's.
   The coordinates of step kk's halves are key_coord(kk, 0 / 1) (the query's B fragment takes the same). */
__device__ __forceinline__ int key_coord(int kk, int half) {  /* first of the two coordinates (of the lane's D/4) */
    return KB == 1 ? 8 * (kk >> 1) + 2 * (kk & 1) + 4 * half : 4 * kk + 2 * half;
}
__device__ __forceinline__ void decode_keys(const u32* w0, const u32* w1, const u8* table, u32 base, u32 (*ka)[4]) {
#pragma unroll
    for (int j = 0; j < KBYTES; ++j) {
        const int i = j >> 2, jj = j & 3;
        if (KB == 4) {
            lookup<1>(w0[i], jj, table, base, &ka[j >> 1][2 * (j & 1)]);
            lookup<1>(w1[i], jj, table, base, &ka[j >> 1][2 * (j & 1) + 1]);
        } else {
            u32 x, y;
            interleave<KB == 2 ? 4 : 2>(w0[i], w1[i], x, y);  /* the same per word: ptxas keeps one */
            if (KB == 2) { lookup<2>(x, jj, table, base, &ka[j][0]); lookup<2>(y, jj, table, base, &ka[j][2]); }
            else { lookup<4>(x, jj, table, base, ka[2 * j]); lookup<4>(y, jj, table, base, ka[2 * j + 1]); }
        }
    }
}

/* The value mma's A fragments va[mt] = (a0, a1, a2, a3) of O^T = V^T P^T, m-tile mt (coordinates 2mt, 2mt+1 of the
   lane's D/8): a0 / a1 = (token 2tid, 2tid+1) at coordinate 2mt / 2mt+1, a2 / a3 = tokens (2tid+8, 2tid+9). v[0..3]
   = those four tokens' code words. Index bytes hold several tokens' codes so that each table word is a pair of two
   tokens' levels (the value side's table orders its code slots so: cuda_split.VALUE_SLOTS), by value bits:
     4: interleave<4>(A, B): [A c | B c] -> one word (a0 from the even codes, a1 the odd);
     2: interleave<4>(A, B): [A c0 c1 | B c0 c1] -> (a0, a1) of m-tile 2J, [A c2 c3 | B c2 c3] -> of m-tile 2J + 1;
     1: interleave<2> of (A, B) and of (C, D), then interleave<4> of those: [A p | B p | C p | D p] (p = a code
        pair) -> a whole quad. */
__device__ __forceinline__ void decode_values(const u32 (*v)[(VBYTES + 3) / 4], const u8* table, u32 base,
                                              u32 (*va)[4]) {
#pragma unroll
    for (int j = 0; j < VBYTES; ++j) {
        const int i = j >> 2, jj = j & 3;
        if (VB == 4 || VB == 2) {
#pragma unroll
            for (int pr = 0; pr < 2; ++pr) {  /* tokens (2tid, 2tid+1), then (2tid+8, 2tid+9) */
                u32 x, y;
                interleave<4>(v[2 * pr][i], v[2 * pr + 1][i], x, y);
                if (VB == 4) {
                    lookup<1>(x, jj, table, base, &va[j][2 * pr]);
                    lookup<1>(y, jj, table, base, &va[j][2 * pr + 1]);
                } else {
                    lookup<2>(x, jj, table, base, &va[2 * j][2 * pr]);
                    lookup<2>(y, jj, table, base, &va[2 * j + 1][2 * pr]);
                }
            }
        } else {
            u32 ab_lo, ab_hi, cd_lo, cd_hi, p0, p1, p2, p3;
            interleave<2>(v[0][i], v[1][i], ab_lo, ab_hi);
            interleave<2>(v[2][i], v[3][i], cd_lo, cd_hi);
            interleave<4>(ab_lo, cd_lo, p0, p2);
            interleave<4>(ab_hi, cd_hi, p1, p3);
            lookup<4>(p0, jj, table, base, va[4 * j]);
            lookup<4>(p1, jj, table, base, va[4 * j + 1]);
            lookup<4>(p2, jj, table, base, va[4 * j + 2]);
            lookup<4>(p3, jj, table, base, va[4 * j + 3]);
        }
    }
}
/* the query's B fragments qf[kk] of head row `qrow` (this lane's D/4 coordinates): the pairs at key_coord(kk, 0 / 1) */
__device__ __forceinline__ void load_query(const u16* qrow, u32 (*qf)[2]) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
        qf[kk][0] = *(const u32*)(qrow + key_coord(kk, 0));
        qf[kk][1] = *(const u32*)(qrow + key_coord(kk, 1));
    }
}

/* S^T [16 tokens x 8 heads] = K Q^T of one tile into s (the lane's accumulator fragment), operands bf16 (BF) or
   fp16 */
template <bool BF>
__device__ __forceinline__ void key_scores(const u32 (*ka)[4], const u32 (*qf)[2], float* s) {
    float s2[4] = {0.f, 0.f, 0.f, 0.f};  /* a second, independent mma chain */
    s[0] = s[1] = s[2] = s[3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
        mma_t<BF>((TWO_CHAINS && (kk & 1)) ? s2 : s, ka[kk][0], ka[kk][1], ka[kk][2], ka[kk][3], qf[kk][0],
                  qf[kk][1]);
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i] += s2[i];
}

#if MIN_BLOCKS > 0
#define BOUNDS __launch_bounds__(NWARPS * 32, MIN_BLOCKS)
#else
#define BOUNDS __launch_bounds__(NWARPS * 32)
#endif
__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c) {  /* a * b + c on two 16-bit values */
    u32 r;
#if IS_BF16
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
#else
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
#endif
    return r;
}
__device__ __forceinline__ float lo_float(u32 pair) {  /* the first of two 16-bit model-dtype values, as float */
#if IS_BF16
    return __uint_as_float(pair << 16);
#else
    return half_to_float((u16)(pair & 0xffff));
#endif
}
__device__ __forceinline__ float hi_float(u32 pair) {
#if IS_BF16
    return __uint_as_float(pair & 0xffff0000u);
#else
    return half_to_float((u16)(pair >> 16));
#endif
}
/* one side's table entry (WORDS words) as the four words of one 16-byte store (4 / WORDS copies) */
template <int WORDS>
__device__ __forceinline__ uint4 entry_quad(const u32* t, int byte) {
    if (WORDS == 4) return __ldg((const uint4*)(t + 4 * byte));
    if (WORDS == 2) { const uint2 v = __ldg((const uint2*)(t + 2 * byte)); return make_uint4(v.x, v.y, v.x, v.y); }
    const u32 v = __ldg(t + byte);
    return make_uint4(v, v, v, v);
}

/* The split kernels' shared steps (codebook and affine): one home each. */
__device__ __forceinline__ void load_tables(u8* table, const u32* table_k, const u32* table_v) {
    /* both sides' byte tables into shared memory, 16 bytes a store: entry byte = [key copies][value copies], or
       with the shared table the key side's copies alone (table_v, equal to it, is not read) */
    uint4* out = (uint4*)table;
    for (int i = threadIdx.x; i < 256 * ENTRY_BYTES / 16; i += NWARPS * 32) {
        const int byte = i / (ENTRY_BYTES / 16), side = SHARED_TABLE ? 0 : (i / (SIDE_BYTES / 16)) & 1;
        out[i] = side ? entry_quad<VWORDS>(table_v, byte) : entry_quad<KWORDS>(table_k, byte);
    }
    __syncthreads();
}

/* this lane's table copy on the key and value side: the low bits of an entry's offset (the value side's copies
   after the key side's, or with the shared table the same copies) */
__device__ __forceinline__ u32 key_base(int lane) { return (lane % KREPL) * KWORDS * 4; }
__device__ __forceinline__ u32 value_base(int lane) {
    return (SHARED_TABLE ? 0 : SIDE_BYTES) + (lane % VREPL) * VWORDS * 4;
}

__device__ __forceinline__ void tile_mask(int t0, bool full, int gid, int end, const u8* mrow, int stride_mn,
                                          bool& ok0, bool& ok1) {
    /* whether this lane's key rows t0 + gid and t0 + gid + 8 are inside the split (all of a full tile) and not
       padding */
    ok0 = full || t0 + gid < end;
    ok1 = full || t0 + gid + 8 < end;
    if (mrow) {
        ok0 = ok0 && mrow[(i64)(t0 + gid) * stride_mn] != 0;
        ok1 = ok1 && mrow[(i64)(t0 + gid + 8) * stride_mn] != 0;
    }
}

__device__ __forceinline__ void online_softmax(const float* s, float& m0, float& m1, float& l0, float& l1,
                                               float& a0, float& a1, float* p) {
    /* flash attention's running max m and sum l of heads 2tid, 2tid+1 over one 16-token tile: s = the lane's scores
       S^T (base 2, NEG_INF where masked); out: the probabilities p and the rescale a0 / a1 of the running sums */
    float x0 = fmaxf(s[0], s[2]), x1 = fmaxf(s[1], s[3]);
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        x0 = fmaxf(x0, __shfl_xor_sync(0xffffffff, x0, o));
        x1 = fmaxf(x1, __shfl_xor_sync(0xffffffff, x1, o));
    }
    const float mn0 = fmaxf(m0, x0), mn1 = fmaxf(m1, x1);
    const float ms0 = mn0 == NEG_INF ? 0.f : mn0, ms1 = mn1 == NEG_INF ? 0.f : mn1;
    a0 = fast_exp2(m0 - ms0);
    a1 = fast_exp2(m1 - ms1);
    p[0] = fast_exp2(s[0] - ms0); p[1] = fast_exp2(s[1] - ms1);
    p[2] = fast_exp2(s[2] - ms0); p[3] = fast_exp2(s[3] - ms1);
    l0 = l0 * a0 + p[0] + p[2];
    l1 = l1 * a1 + p[1] + p[3];
    m0 = mn0; m1 = mn1;
}

__device__ __forceinline__ void accumulate_pv(float (*acc)[4], const u32 (*va)[4], float a0, float a1, u32 pb0,
                                              u32 pb1) {
    /* O^T [D x 8 heads] = O^T * rescale + V^T P^T: va = ``decode_values``' A fragments, pb = P^T as B fragments */
#if LAZY_RESCALE
    if (__any_sync(0xffffffff, a0 != 1.f || a1 != 1.f))  /* warp-uniform: exp2(0) is exactly 1 */
#endif
    {
#pragma unroll
        for (int mt = 0; mt < VREGS; ++mt) {
            acc[mt][0] *= a0; acc[mt][1] *= a1; acc[mt][2] *= a0; acc[mt][3] *= a1;
        }
    }
#pragma unroll
    for (int mt = 0; mt < VREGS; ++mt) mma(acc[mt], va[mt][0], va[mt][1], va[mt][2], va[mt][3], pb0, pb1);
}

/* `c`, the same in every lane of the warp, as a warp vote: ptxas then knows the branch on it does not diverge and
   keeps block-uniform values (the table's base) in uniform registers, so a lookup's LDS adds the base for free
   ([R+UR]); a plain loop bound that depends on the warp index costs an add per lookup */
__device__ __forceinline__ bool uniform(bool c) { return __any_sync(0xffffffff, c); }

/* The split's tiles, each fetched DEPTH tiles ahead into one of DEPTH + 1 buffers in turn (no register copies
   between tiles): whole tiles unclamped, then a partial last tile clamped into the split. fetch(raw, t0, clamp) loads
   a tile, step(raw, t0, full) consumes it. */
template <class Raw, class Fetch, class Step>
__device__ __forceinline__ void split_loop(int start, int end, Fetch&& fetch, Step&& step) {
    const int full_end = start + max(end - start, 0) / TILE * TILE;
    int t0 = start;
#if DEPTH == 2
    Raw a, b, c;  /* at the top of each pass: a = tile t0, b = tile t0 + TILE (those inside the whole tiles) */
    if (uniform(t0 < full_end)) fetch(a, t0, false);
    if (uniform(t0 + TILE < full_end)) fetch(b, t0 + TILE, false);
    for (; uniform(t0 + 3 * TILE <= full_end); t0 += 3 * TILE) {
        fetch(c, t0 + 2 * TILE, false);
        step(a, t0, true);
        if (uniform(t0 + 3 * TILE < full_end)) fetch(a, t0 + 3 * TILE, false);
        step(b, t0 + TILE, true);
        if (uniform(t0 + 4 * TILE < full_end)) fetch(b, t0 + 4 * TILE, false);
        step(c, t0 + 2 * TILE, true);
    }
    if (uniform(t0 < full_end)) { step(a, t0, true); t0 += TILE; }
    if (uniform(t0 < full_end)) { step(b, t0, true); t0 += TILE; }
    if (uniform(t0 < end)) { fetch(a, t0, true); step(a, t0, false); }
#else
    Raw a, b;
    if (uniform(t0 < full_end)) fetch(a, t0, false);
    for (; uniform(t0 + 2 * TILE <= full_end); t0 += 2 * TILE) {
        fetch(b, t0 + TILE, false);
        step(a, t0, true);
        if (uniform(t0 + 2 * TILE < full_end)) fetch(a, t0 + 2 * TILE, false);
        step(b, t0 + TILE, true);
    }
    if (uniform(t0 < full_end)) { step(a, t0, true); t0 += TILE; }
    if (uniform(t0 < end)) { fetch(a, t0, true); step(a, t0, false); }
#endif
}

__device__ __forceinline__ void write_partials(float* m_out, float* l_out, float* acc_out, i64 row, int G, int gid,
                                               int tid, float m0, float m1, float l0, float l1, float (*acc)[4]) {
    /* the split's partial (max, sum, unnormalized output) of heads 2tid, 2tid+1 into row `row` of the outputs */
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        l0 += __shfl_xor_sync(0xffffffff, l0, o);
        l1 += __shfl_xor_sync(0xffffffff, l1, o);
    }
    const int h0 = 2 * tid, h1 = 2 * tid + 1;
    if (gid == 0) {
        if (h0 < G) { m_out[row * G + h0] = m0; l_out[row * G + h0] = l0; }
        if (h1 < G) { m_out[row * G + h1] = m1; l_out[row * G + h1] = l1; }
    }
#pragma unroll
    for (int mt = 0; mt < VREGS; ++mt) {
        const int dim = gid * (D / 8) + 2 * mt;
        if (h0 < G) {
            acc_out[(row * G + h0) * D + dim] = acc[mt][0];
            acc_out[(row * G + h0) * D + dim + 1] = acc[mt][2];
        }
        if (h1 < G) {
            acc_out[(row * G + h1) * D + dim] = acc[mt][1];
            acc_out[(row * G + h1) * D + dim + 1] = acc[mt][3];
        }
    }
}
"""
