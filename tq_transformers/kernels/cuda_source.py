"""CUDA C++ source of the codebook split kernel (``cuda_split``), kept apart from its launcher, and the prelude it
shares with the affine kernel (``cuda_affine_source``): defines, load / convert / mma helpers, the table decoder,
the online softmax and the tile loop.

Placeholders ``__D__`` (head_dim), ``__KB__`` / ``__VB__`` (key / value bits), ``__NWARPS__``, ``__BF16__``,
``__CHAINS__``, ``__LAZY__``, ``__DEPTH__``, ``__MINB__`` are filled by ``cuda_split._source`` (``CUDA_PLAN``). The
layouts are explained in ``cuda_split``'s docstring.
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
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define KWORDS (4 / KB)           /* 32-bit words (code pairs) a key byte decodes to */
#define VWORDS (4 / VB)
#define KREPL (32 / KWORDS)       /* table copies: one per lane of a conflict-free phase */
#define VREPL (32 / VWORDS)
#define ENTRY_BYTES 256           /* shared-memory bytes of one byte value: [side (key, value)][copy][word] */
#define SIDE_BYTES 128            /* one side's copies of one entry: REPL * WORDS words */
#define TABLE_BYTES (256 * ENTRY_BYTES)
#define TILE 16                   /* tokens a tile: the mma's M (keys) and K (values) */
#define KBYTES (D * KB / 32)      /* key bytes a lane reads per token: D/4 codes */
#define VBYTES (D * VB / 64)      /* value bytes a lane reads per token: D/8 codes */
#define KROW (D * KB / 8)         /* bytes of one token's key codes (rows back to back: cuda_split._pair_fits) */
#define VROW (D * VB / 8)
#define VREGS (D / 16)            /* value code pairs a lane holds per token = m-tiles */
#define KSTEPS (D / 16)
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ void load_bytes(const u8* p, u32* w, int nbytes) {
    if (nbytes == 32) { uint4 a = __ldg((const uint4*)p); uint4 b = __ldg((const uint4*)(p + 16));
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w; }
    else if (nbytes == 16) { uint4 a = __ldg((const uint4*)p); w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; }
    else if (nbytes == 8) { uint2 a = __ldg((const uint2*)p); w[0] = a.x; w[1] = a.y; }
    else if (nbytes == 4) { w[0] = __ldg((const u32*)p); }
    else if (nbytes == 2) { w[0] = __ldg((const u16*)p); }
    else { w[0] = __ldg(p); }
}

__device__ __forceinline__ void load_shared(const u8* p, u32* w, int nbytes) {  /* load_bytes from shared memory */
    if (nbytes == 32) {
        const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 16);
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else if (nbytes == 16) { const uint4 a = *(const uint4*)p; w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w; }
    else if (nbytes == 8) { const uint2 a = *(const uint2*)p; w[0] = a.x; w[1] = a.y; }
    else if (nbytes == 4) { w[0] = *(const u32*)p; }
    else if (nbytes == 2) { w[0] = *(const u16*)p; }
    else { w[0] = *p; }
}

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
   cuda_split's docstring draws the layout) */
template <int WORDS>
__device__ __forceinline__ void lookup(u32 idx, int j, const u8* table, u32 base, u32* dst) {
    const u32 off = prmt(base, idx, 0x3240 + 0x10 * j);  /* base.b0, idx.byte(j), 0, 0 */
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
    /* both sides' byte tables into shared memory, 16 bytes a store: entry byte = [key copies][value copies] */
    uint4* out = (uint4*)table;
    for (int i = threadIdx.x; i < 256 * ENTRY_BYTES / 16; i += NWARPS * 32) {
        const int byte = i / (ENTRY_BYTES / 16), side = (i / (SIDE_BYTES / 16)) & 1;
        out[i] = side ? entry_quad<VWORDS>(table_v, byte) : entry_quad<KWORDS>(table_k, byte);
    }
    __syncthreads();
}

/* this lane's table copy on the key and value side: bits 0..7 of an entry's offset */
__device__ __forceinline__ u32 key_base(int lane) { return (lane % KREPL) * KWORDS * 4; }
__device__ __forceinline__ u32 value_base(int lane) { return SIDE_BYTES + (lane % VREPL) * VWORDS * 4; }

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

CODEBOOK_SPLIT_SOURCE = PRELUDE + r"""
/* one tile's raw bytes and scales for this lane: key rows gid, gid + 8; value rows 2tid, 2tid+1, 2tid+8, 2tid+9 */
struct Raw { u32 k0[(KBYTES + 3) / 4], k1[(KBYTES + 3) / 4], v[4][(VBYTES + 3) / 4]; u16 kn0, kn1, vn0, vn1; };

/* Staging (RING > 0): each warp owns a ring of RING tiles in shared memory after the table. A whole tile is copied
   in with 16-byte cp.async chunks spread over the warp's lanes (its key rows, value rows and 16 + 16 scales are each
   contiguous in the cache), RING - 1 tiles ahead of the one decoded; the lanes then read their bytes back. Value rows
   of 32 bytes or more have their 16-byte chunks XOR-swizzled by row pair, so that the four rows 2tid + x a read
   touches fall in different banks. */
#define RING __RING__
#define KTILE (TILE * KROW)
#define VTILE (TILE * VROW)
#define STAGE_BYTES (KTILE + VTILE + 4 * TILE)  /* codes, then 16 key scales and 16 value scales (fp16) */
#define CPR (VROW / 16)                         /* 16-byte chunks a value row */

__device__ __forceinline__ int vchunk(int row, int chunk) {  /* the chunk's place in its row */
    return CPR >= 2 ? chunk ^ ((row >> 1) & (CPR - 1)) : chunk;
}
__device__ __forceinline__ void cp16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}

#define KCHUNKS ((KTILE / 16 + 31) / 32)      /* 16-byte key chunks a lane copies (the last ones maybe idle) */
#define VCHUNKS ((VTILE / 16 + 31) / 32)

/* A lane's part of the ring, fixed for the kernel: where its copies go in a stage (bytes from the warp's stage),
   and where its reads come from. */
struct Lane {
    int vdst[VCHUNKS];        /* its value chunks' places (swizzled) */
    int k0, v[4];             /* its key row gid's and four value rows' bytes in a stage */
    const u8* scale_src;      /* its 16 bytes of the tile's scales (lanes 0..3: key scales 0..15, value scales) */
};

__device__ __forceinline__ Lane lane_plan(int lane, int gid, int tid, const u16* ksbh, const u16* vsbh) {
    Lane l;
#pragma unroll
    for (int i = 0; i < VCHUNKS; ++i) {  /* rows shorter than a chunk (CPR 0) are not swizzled */
        const int c = lane + 32 * i, row = CPR ? c / (CPR ? CPR : 1) : 0;
        l.vdst[i] = CPR ? KTILE + row * VROW + 16 * vchunk(row, c % (CPR ? CPR : 1)) : KTILE + 16 * c;
    }
    l.k0 = gid * KROW + tid * KBYTES;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = 2 * tid + (i & 1) + 8 * (i >> 1), byte = gid * VBYTES;
        l.v[i] = KTILE + row * VROW + 16 * vchunk(row, byte / 16) + byte % 16;
    }
    l.scale_src = lane < 2 ? (const u8*)ksbh + 16 * lane : (const u8*)vsbh + 16 * (lane & 1);
    return l;
}

/* the whole tile t (rows from the batch-head's codes kbh / vbh, t * TILE on) into the stage at shared address st,
   then one commit group */
__device__ __forceinline__ void stage_tile(u32 st, int lane, const Lane& l, const u8* kbh, const u8* vbh, i64 t) {
    const u8* kt = kbh + t * KROW;
    const u8* vt = vbh + t * VROW;
#pragma unroll
    for (int i = 0; i < KCHUNKS; ++i) {
        const int c = 16 * (lane + 32 * i);
        if (KTILE / 16 % 32 == 0 || lane + 32 * i < KTILE / 16) cp16(st + c, kt + c);
    }
#pragma unroll
    for (int i = 0; i < VCHUNKS; ++i)
        if (VTILE / 16 % 32 == 0 || lane + 32 * i < VTILE / 16) cp16(st + l.vdst[i], vt + 16 * (lane + 32 * i));
    if (lane < 4) cp16(st + KTILE + VTILE + 16 * lane, l.scale_src + 2 * t);
    cp_commit();
}

/* this lane's bytes of the staged tile at `st`, as fetch() would have loaded them */
__device__ __forceinline__ void read_stage(Raw& r, const u8* st, const Lane& l, int gid) {
    load_shared(st + l.k0, r.k0, KBYTES);
    load_shared(st + l.k0 + 8 * KROW, r.k1, KBYTES);
#pragma unroll
    for (int i = 0; i < 4; ++i) load_shared(st + l.v[i], r.v[i], VBYTES);
    const u16* sc = (const u16*)(st + KTILE + VTILE) + gid;
    r.kn0 = sc[0]; r.kn1 = sc[8]; r.vn0 = sc[TILE]; r.vn1 = sc[TILE + 8];
}

extern "C" __global__ void BOUNDS codebook_split(
    const u16* Q, const float* MU, const u8* KC, const u16* KS, const u8* VC, const u16* VS,
    const u32* TABLE_K, const u32* TABLE_V, const u8* MASK, const i64* LENS,
    float* M_OUT, float* L_OUT, float* ACC_OUT,
    int n_q, int tokens_per_split, int num_splits, int num_heads, int G,
    int stride_kcb, int stride_kch, int stride_ksb, int stride_ksh,
    int stride_vcb, int stride_vch, int stride_vsb, int stride_vsh,
    int stride_mb, int stride_mn, float sm_scale_log2)
{
    extern __shared__ uint4 smem[];
    u8* table = (u8*)smem;
    load_tables(table, TABLE_K, TABLE_V);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const int split = blockIdx.x * NWARPS + warp;
    if (uniform(split >= num_splits)) return;
    const int bh = blockIdx.y, b = bh / num_heads, h = bh % num_heads;
    if (LENS) n_q = (int)LENS[0];
    const int start = split * tokens_per_split;
    const int end = min(start + tokens_per_split, n_q);

    /* the query's B fragments: head gid, coordinates tid*D/4 + 4ks + {0,1} and {2,3} */
    u32 qf[KSTEPS][2];
    float qmu = 0.f;
    /* lanes of the mma's padding heads (gid >= G) load head 0 again: their S^T columns are never written out, and
       loading beats a select that ptxas would redo in every tile */
    const u16* qrow = Q + ((i64)bh * G + (gid < G ? gid : 0)) * D + tid * (D / 4);
    load_query(qrow, qf);
    if (MU) {
        const float* mu = MU + (i64)bh * D + tid * (D / 4);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int c = key_coord(kk, half);
                qmu += lo_float(qf[kk][half]) * mu[c] + hi_float(qf[kk][half]) * mu[c + 1];
            }
        qmu += __shfl_xor_sync(0xffffffff, qmu, 1);
        qmu += __shfl_xor_sync(0xffffffff, qmu, 2);
    }
    const float qmu0 = __shfl_sync(0xffffffff, qmu, (2 * tid) * 4);      /* heads 2tid, 2tid+1 of the S^T columns */
    const float qmu1 = __shfl_sync(0xffffffff, qmu, (2 * tid + 1) * 4);

    float acc[VREGS][4];
#pragma unroll
    for (int i = 0; i < VREGS; ++i) { acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f; }
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    /* this lane's first bytes of token 0: key rows gid (+8), value rows 2tid (+1, +8, +9), one scale a token */
    const u8* kc = KC + (i64)b * stride_kcb + (i64)h * stride_kch + (i64)gid * KROW + tid * KBYTES;
    const u16* ks = KS + (i64)b * stride_ksb + (i64)h * stride_ksh + gid;
    const u8* vc = VC + (i64)b * stride_vcb + (i64)h * stride_vch + (i64)(2 * tid) * VROW + gid * VBYTES;
    const u16* vs = VS + (i64)b * stride_vsb + (i64)h * stride_vsh + gid;
    const u8* mrow = MASK ? MASK + (i64)b * stride_mb : 0;
    const u32 kbase = key_base(lane), vbase = value_base(lane);
    const int last = end - 1;

    auto fetch = [&](Raw& r, int t0, bool clamp) {
        /* rows t0 + x, or (a partial tile) min(t0 + x, last) - min(t0 + gid + x, last) - gid keeps the lane's base */
        auto row = [&](int lane_row, int x) {
            return clamp ? (i64)(min(t0 + lane_row + x, last) - lane_row) : (i64)t0 + x;
        };
        load_bytes(kc + row(gid, 0) * KROW, r.k0, KBYTES);
        load_bytes(kc + row(gid, 8) * KROW, r.k1, KBYTES);
#pragma unroll
        for (int i = 0; i < 4; ++i) load_bytes(vc + row(2 * tid, (i & 1) + 8 * (i >> 1)) * VROW, r.v[i], VBYTES);
        r.kn0 = __ldg(ks + row(gid, 0));
        r.kn1 = __ldg(ks + row(gid, 8));
        r.vn0 = __ldg(vs + row(gid, 0));
        r.vn1 = __ldg(vs + row(gid, 8));
    };
    auto step = [&](const Raw& r, int t0, bool full) {
        const float kn0 = half_to_float(r.kn0), kn1 = half_to_float(r.kn1);
        const float vn0 = half_to_float(r.vn0), vn1 = half_to_float(r.vn1);
        bool ok0, ok1;
        tile_mask(t0, full, gid, end, mrow, stride_mn, ok0, ok1);
        /* scores S^T [16 tokens x 8 heads] */
        u32 ka[KSTEPS][4];
        decode_keys(r.k0, r.k1, table, kbase, ka);
        float s[4];
        key_scores<IS_BF16>(ka, qf, s);
        s[0] = ok0 ? (s[0] * kn0 + qmu0) * sm_scale_log2 : NEG_INF;
        s[1] = ok0 ? (s[1] * kn0 + qmu1) * sm_scale_log2 : NEG_INF;
        s[2] = ok1 ? (s[2] * kn1 + qmu0) * sm_scale_log2 : NEG_INF;
        s[3] = ok1 ? (s[3] * kn1 + qmu1) * sm_scale_log2 : NEG_INF;
        float a0, a1, p[4];
        online_softmax(s, m0, m1, l0, l1, a0, a1, p);
        const u32 pb0 = transpose8x8(pack2(p[0] * vn0, p[1] * vn0));
        const u32 pb1 = transpose8x8(pack2(p[2] * vn1, p[3] * vn1));
        /* values: O^T [D x 8 heads] += V^T P^T */
        u32 va[VREGS][4];
        decode_values(r.v, table, vbase, va);
        accumulate_pv(acc, va, a0, a1, pb0, pb1);
    };
#if RING
    /* whole tiles through the ring, then a partial last tile through registers (clamped) */
    const u8* kbh = KC + (i64)b * stride_kcb + (i64)h * stride_kch;
    const u8* vbh = VC + (i64)b * stride_vcb + (i64)h * stride_vch;
    const Lane lp = lane_plan(lane, gid, tid, KS + (i64)b * stride_ksb + (i64)h * stride_ksh,
                              VS + (i64)b * stride_vsb + (i64)h * stride_vsh);
    u8* ring = table + TABLE_BYTES + warp * (RING * STAGE_BYTES);
    const u32 ring_s = (u32)__cvta_generic_to_shared(ring);
    const int tiles = max(end - start, 0) / TILE, t_first = start / TILE;
    int wr = 0, rd = 0;  /* the stages tile i + RING - 1 goes to and tile i comes from (byte offsets) */
    auto issue = [&](int i) {  /* tile i of the split into stage wr, or an empty group (the counts stay uniform) */
        if (uniform(i < tiles)) stage_tile(ring_s + wr, lane, lp, kbh, vbh, (i64)(t_first + i) * TILE);
        else cp_commit();
        wr = wr == (RING - 1) * STAGE_BYTES ? 0 : wr + STAGE_BYTES;
    };
#pragma unroll
    for (int i = 0; i < RING - 1; ++i) issue(i);
    for (int i = 0; uniform(i < tiles); ++i) {
        __syncwarp();             /* every lane has read tile i - 1, whose stage tile i + RING - 1 takes */
        issue(i + RING - 1);
        cp_wait<RING - 1>();      /* this lane's copies of tile i have landed */
        __syncwarp();             /* and every lane's */
        Raw r;
        read_stage(r, ring + rd, lp, gid);
        rd = rd == (RING - 1) * STAGE_BYTES ? 0 : rd + STAGE_BYTES;
        step(r, start + i * TILE, true);
    }
    const int t_tail = start + tiles * TILE;
    if (uniform(t_tail < end)) { Raw r; fetch(r, t_tail, true); step(r, t_tail, false); }
#else
    split_loop<Raw>(start, end, fetch, step);
#endif
    write_partials(M_OUT, L_OUT, ACC_OUT, (i64)bh * num_splits + split, G, gid, tid, m0, m1, l0, l1, acc);
}
"""
