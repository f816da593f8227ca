"""CUDA C++ source of the codebook split kernel (``cuda_split``), kept apart from its launcher, and the prelude it
shares with the affine kernel (``cuda_affine_source``): defines, load / convert / mma helpers, the table decoder.

Placeholders ``__D__`` (head_dim), ``__KB__`` / ``__VB__`` (key / value bits), ``__NWARPS__``, ``__SAME__`` (one
decode table for both sides), ``__BF16__``, ``__PREFETCH__``, ``__CHAINS__``, ``__MINB__`` are filled by
``cuda_split._build`` (``CUDA_PLAN``). The layouts are explained in ``cuda_split``'s docstring.
"""

PRELUDE = r"""
#define D __D__
#define KB __KB__
#define VB __VB__
#define NWARPS __NWARPS__
#define SAME_TABLE __SAME__
#define IS_BF16 __BF16__
#define PREFETCH __PREFETCH__     /* load the next tile before decoding this one */
#define TWO_CHAINS __CHAINS__     /* the key mma steps as two independent accumulation chains */
#define MIN_BLOCKS __MINB__       /* __launch_bounds__ blocks per SM (0: no register cap) */
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#define KWORDS (4 / KB)           /* 32-bit words (code pairs) a key byte decodes to */
#define VWORDS (4 / VB)
#define KREPL (32 / KWORDS)       /* table copies: one per lane of a conflict-free phase */
#define VREPL (32 / VWORDS)
#define KBYTES (D * KB / 32)      /* key bytes a lane reads per token: D/4 codes */
#define VBYTES (D * VB / 64)      /* value bytes a lane reads per token: D/8 codes */
#define KREGS (D / 8)             /* key code pairs a lane holds per token */
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
__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if IS_BF16
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* bytes w (nbytes of them) -> code pairs out[] through the replicated table (WORDS words an entry) */
template <int NBYTES, int WORDS, int REPL>
__device__ __forceinline__ void decode(const u32* w, const u32* table, int lane, u32* out) {
    const u32* base = table + (lane % REPL) * WORDS;
#pragma unroll
    for (int j = 0; j < NBYTES; ++j) {
        u32 byte = (w[j >> 2] >> ((j & 3) * 8)) & 0xff;
        const u32* e = base + byte * (REPL * WORDS);
        if (WORDS == 1) { out[j] = e[0]; }
        else if (WORDS == 2) { uint2 v = *(const uint2*)e; out[2 * j] = v.x; out[2 * j + 1] = v.y; }
        else {
            uint4 v = *(const uint4*)e;
            out[4 * j] = v.x; out[4 * j + 1] = v.y; out[4 * j + 2] = v.z; out[4 * j + 3] = v.w;
        }
    }
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
__device__ __forceinline__ u32 broadcast2(u16 h) {  /* an fp16 metadata value as two model-dtype values */
#if IS_BF16
    const float f = half_to_float(h); return pack2(f, f);
#else
    return (u32)h | ((u32)h << 16);
#endif
}
/* The split kernels' shared steps (codebook and affine): one home each. */
__device__ __forceinline__ void load_tables(u32* tk, u32* tv, const u32* table_k, const u32* table_v) {
    /* the byte tables into shared memory, KREPL / VREPL copies (entry = byte, copy, word), then a barrier */
    for (int e = threadIdx.x; e < 256 * 32; e += NWARPS * 32) {
        int byte = e / 32, rest = e % 32;
        tk[e] = table_k[byte * KWORDS + rest % KWORDS];
        if (!SAME_TABLE) tv[e] = table_v[byte * VWORDS + rest % VWORDS];
    }
    __syncthreads();
}

__device__ __forceinline__ void tile_mask(int t0, int gid, int end, const u8* mrow, int stride_mn, bool& ok0,
                                          bool& ok1) {
    /* whether this lane's key rows t0 + gid and t0 + gid + 8 are inside the split and not padding */
    ok0 = t0 + gid < end;
    ok1 = t0 + gid + 8 < end;
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

__device__ __forceinline__ void accumulate_pv(float (*acc)[4], u32 (*v)[VREGS], float a0, float a1, u32 pb0,
                                              u32 pb1) {
    /* O^T [D x 8 heads] = O^T * rescale + V^T P^T: v = the four value rows' decoded pairs, pb = P^T as B fragments */
#pragma unroll
    for (int mt = 0; mt < VREGS; ++mt) {
        acc[mt][0] *= a0; acc[mt][1] *= a1; acc[mt][2] *= a0; acc[mt][3] *= a1;
        mma(acc[mt], prmt(v[0][mt], v[1][mt], 0x5410), prmt(v[0][mt], v[1][mt], 0x7632),
            prmt(v[2][mt], v[3][mt], 0x5410), prmt(v[2][mt], v[3][mt], 0x7632), pb0, pb1);
    }
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

__device__ __forceinline__ void fetch(Raw& r, int t0, int last, const u8* kc, const u16* ks, const u8* vc,
                                      const u16* vs, int skn, int ssn, int svn, int svsn, int gid, int tid) {
    const int nk0 = min(t0 + gid, last), nk1 = min(t0 + gid + 8, last);  /* clamped into the split */
    load_bytes(kc + (i64)nk0 * skn, r.k0, KBYTES);
    load_bytes(kc + (i64)nk1 * skn, r.k1, KBYTES);
#pragma unroll
    for (int i = 0; i < 4; ++i)
        load_bytes(vc + (i64)min(t0 + 2 * tid + (i & 1) + 8 * (i >> 1), last) * svn, r.v[i], VBYTES);
    r.kn0 = __ldg(ks + (i64)nk0 * ssn);
    r.kn1 = __ldg(ks + (i64)nk1 * ssn);
    r.vn0 = __ldg(vs + (i64)nk0 * svsn);
    r.vn1 = __ldg(vs + (i64)nk1 * svsn);
}

extern "C" __global__ void BOUNDS codebook_split(
    const u16* Q, const float* MU, const u8* KC, const u16* KS, const u8* VC, const u16* VS,
    const u32* TABLE_K, const u32* TABLE_V, const u8* MASK, const i64* LENS,
    float* M_OUT, float* L_OUT, float* ACC_OUT,
    int n_q, int tokens_per_split, int num_splits, int num_heads, int G,
    int stride_kcb, int stride_kch, int stride_kcn, int stride_ksb, int stride_ksh, int stride_ksn,
    int stride_vcb, int stride_vch, int stride_vcn, int stride_vsb, int stride_vsh, int stride_vsn,
    int stride_mb, int stride_mn, float sm_scale_log2)
{
    extern __shared__ u32 smem[];
    u32* tk = smem;
    u32* tv = SAME_TABLE ? smem : smem + 256 * 32;
    load_tables(tk, tv, TABLE_K, TABLE_V);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tid = lane & 3;
    const int split = blockIdx.x * NWARPS + warp;
    if (split >= num_splits) return;
    const int bh = blockIdx.y, b = bh / num_heads, h = bh % num_heads;
    if (LENS) n_q = (int)LENS[0];
    const int start = split * tokens_per_split;
    const int end = min(start + tokens_per_split, n_q);

    /* the query's B fragments: head gid, coordinates tid*D/4 + 4ks + {0,1} and {2,3} */
    u32 qf[KSTEPS][2];
    float qmu = 0.f;
    const bool head_ok = gid < G;
    const u16* qrow = Q + ((i64)bh * G + (head_ok ? gid : 0)) * D + tid * (D / 4);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        uint2 v = *(const uint2*)(qrow + 4 * ks);
        qf[ks][0] = head_ok ? v.x : 0u;
        qf[ks][1] = head_ok ? v.y : 0u;
    }
    if (MU) {
        const float* mu = MU + (i64)bh * D + tid * (D / 4);
        const u16* qh = (const u16*)qf;
#pragma unroll
        for (int i = 0; i < D / 4; ++i) {
#if IS_BF16
            float qv = __uint_as_float(((u32)qh[i]) << 16);
#else
            float qv = half_to_float(qh[i]);
#endif
            qmu += qv * mu[i];
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

    const u8* kc = KC + (i64)b * stride_kcb + (i64)h * stride_kch + tid * KBYTES;
    const u16* ks = KS + (i64)b * stride_ksb + (i64)h * stride_ksh;
    const u8* vc = VC + (i64)b * stride_vcb + (i64)h * stride_vch + gid * VBYTES;
    const u16* vs = VS + (i64)b * stride_vsb + (i64)h * stride_vsh;
    const u8* mrow = MASK ? MASK + (i64)b * stride_mb : 0;

    const int last = end - 1;
    Raw cur, nxt;
#if PREFETCH
    if (start < end) fetch(cur, start, last, kc, ks, vc, vs, stride_kcn, stride_ksn, stride_vcn, stride_vsn, gid, tid);
#endif
    for (int t0 = start; t0 < end; t0 += 16) {
#if PREFETCH
        if (t0 + 16 < end)
            fetch(nxt, t0 + 16, last, kc, ks, vc, vs, stride_kcn, stride_ksn, stride_vcn, stride_vsn, gid, tid);
#else
        fetch(cur, t0, last, kc, ks, vc, vs, stride_kcn, stride_ksn, stride_vcn, stride_vsn, gid, tid);
#endif
        const float kn0 = half_to_float(cur.kn0), kn1 = half_to_float(cur.kn1);
        const float vn0 = half_to_float(cur.vn0), vn1 = half_to_float(cur.vn1);
        bool ok0, ok1;
        tile_mask(t0, gid, end, mrow, stride_mn, ok0, ok1);
        /* scores S^T [16 tokens x 8 heads] */
        u32 k0[KREGS], k1[KREGS];
        decode<KBYTES, KWORDS, KREPL>(cur.k0, tk, lane, k0);
        decode<KBYTES, KWORDS, KREPL>(cur.k1, tk, lane, k1);
        float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};  /* two independent mma chains */
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            mma((TWO_CHAINS && (kk & 1)) ? s2 : s, k0[2 * kk], k1[2 * kk], k0[2 * kk + 1], k1[2 * kk + 1],
                qf[kk][0], qf[kk][1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] += s2[i];
        s[0] = ok0 ? (s[0] * kn0 + qmu0) * sm_scale_log2 : NEG_INF;
        s[1] = ok0 ? (s[1] * kn0 + qmu1) * sm_scale_log2 : NEG_INF;
        s[2] = ok1 ? (s[2] * kn1 + qmu0) * sm_scale_log2 : NEG_INF;
        s[3] = ok1 ? (s[3] * kn1 + qmu1) * sm_scale_log2 : NEG_INF;
        float a0, a1, p[4];
        online_softmax(s, m0, m1, l0, l1, a0, a1, p);
        const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
        const u32 pb0 = transpose8x8(pack2(p0 * vn0, p1 * vn0));
        const u32 pb1 = transpose8x8(pack2(p2 * vn1, p3 * vn1));
        /* values: O^T [D x 8 heads] += V^T P^T */
        u32 v[4][VREGS];
#pragma unroll
        for (int i = 0; i < 4; ++i) decode<VBYTES, VWORDS, VREPL>(cur.v[i], tv, lane, v[i]);
        accumulate_pv(acc, v, a0, a1, pb0, pb1);
#if PREFETCH
        cur = nxt;
#endif
    }
    write_partials(M_OUT, L_OUT, ACC_OUT, (i64)bh * num_splits + split, G, gid, tid, m0, m1, l0, l1, acc);
}
"""
