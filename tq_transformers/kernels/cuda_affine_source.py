"""CUDA C++ source of the affine split kernel (KIVI: ``formats.ChannelAffinePacked`` keys, ``TokenAffinePacked``
values), on the shared prelude (``cuda_prelude.PRELUDE``) and the same lane layout (``cuda_split``).

Extra placeholders: ``__KG__`` (tokens a key group) and ``__VG__`` (channels a value group). What differs from the
codebook kernel:

- codes decode through the byte table of the integers 0 .. 2^b - 1 (exact in 16 bits; fp16 on the key side, the
  model dtype on the value side);
- keys: x_hat = zero[g, c] + code * scale[g, c] per channel c of token group g, so q . x_hat = (q * scale[g]) . code
  + q . zero[g]. The key side runs in fp16 whatever the model dtype (the codes are exact, and fp16 holds a bf16
  query exactly in its range): at the first tile of each group the lane's query fragment is multiplied by its
  channels' fp16 scales with one f16x2 multiply a pair (rounded once to fp16, clamped to fp16's finite range), and
  the bias q . zero[g] of 16 groups at once is one more fp16 mma pass with the zeros as the A operand (the groups as
  its rows), read out per group with a shuffle; the mma then runs on the integer codes;
- values: x_hat = zero[n, j] + code * scale[n, j] per token n and channel group j; a lane's D/8 coordinates lie in one
  channel group (VG a multiple of D/8), so each decoded pair is dequantized in registers with one fma on two 16-bit
  values (scale and zero rounded to the model dtype), then the mma as for codebook values.
"""

from .cuda_prelude import PRELUDE

AFFINE_SPLIT_SOURCE = PRELUDE + r"""
#define KG __KG__                 /* tokens a key group (a multiple of 16: a tile never straddles two groups) */
#define VG __VG__                 /* channels a value group (a multiple of D / 8) */
#define VSROW (D / VG)            /* value scales of one token (rows back to back: cuda_split._pair_fits) */
#define BIAS_GROUPS 16            /* key groups a bias mma pass covers: the mma's M */

struct RawA { u32 k0[(KBYTES + 3) / 4], k1[(KBYTES + 3) / 4], v[4][(VBYTES + 3) / 4]; u16 vs[4], vz[4]; };

#define HALF_MAX 65504.f

__device__ __forceinline__ u32 to_half2(u32 pair) {  /* two model-dtype values as fp16, clamped to its finite range */
#if IS_BF16
    const float lo = fminf(fmaxf(lo_float(pair), -HALF_MAX), HALF_MAX);
    const float hi = fminf(fmaxf(hi_float(pair), -HALF_MAX), HALF_MAX);
    u32 r; asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
#else
    return pair;
#endif
}
__device__ __forceinline__ u32 mul_half2(u32 a, u32 b) {  /* a * b on fp16 pairs, clamped to fp16's finite range */
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    asm("min.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0x7bff7bffu));
    asm("max.f16x2 %0, %0, %1;" : "+r"(r) : "r"(0xfbfffbffu));
    return r;
}

__device__ __forceinline__ u32 pair2(u16 lo, u16 hi) {  /* two fp16 metadata values as two model-dtype values */
#if IS_BF16
    return pack2(half_to_float(lo), half_to_float(hi));
#else
    return (u32)lo | ((u32)hi << 16);
#endif
}

extern "C" __global__ void BOUNDS affine_split(
    const u16* Q, const u8* KC, const u16* KS, const u16* KZ, const u8* VC, const u16* VS, const u16* VZ,
    const u32* TABLE_K, const u32* TABLE_V, const u8* MASK, const i64* LENS,
    float* M_OUT, float* L_OUT, float* ACC_OUT,
    int n_q, int tokens_per_split, int num_splits, int num_heads, int G,
    int stride_kcb, int stride_kch, int stride_ksb, int stride_ksh, int stride_ksg,
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

    /* the query's B fragments (key_coord) in fp16 (q16); qf = q16 times the current group's scales. Lanes of the
       mma's padding heads (gid >= G) load head 0 again: their S^T columns are never written out, and loading beats
       a select that ptxas would redo in every tile */
    u32 q16[KSTEPS][2], qf[KSTEPS][2];
    load_query(Q + ((i64)bh * G + (gid < G ? gid : 0)) * D + tid * (D / 4), q16);
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) { q16[kk][0] = to_half2(q16[kk][0]); q16[kk][1] = to_half2(q16[kk][1]); }
    const u16* ksb = KS + (i64)b * stride_ksb + (i64)h * stride_ksh + tid * (D / 4);
    const u16* kzb = KZ + (i64)b * stride_ksb + (i64)h * stride_ksh + tid * (D / 4);
    int group = -1, zgroup = -BIAS_GROUPS;  /* the current key group; the first of the 16 whose biases zc holds */
    float zc[4];  /* (q . zero)^T [16 groups x 8 heads] from zgroup on: the lane's accumulator fragment */
    float bias0 = 0.f, bias1 = 0.f;  /* q . zero[group] of heads 2tid, 2tid+1 (the S^T columns) */

    float acc[VREGS][4];
#pragma unroll
    for (int i = 0; i < VREGS; ++i) { acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f; }
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    /* this lane's first bytes of token 0 (a key group's rows back to back, the groups too): key rows gid (+8), value
       rows 2tid (+1, +8, +9) and their scales and zeros */
    const u8* kc = KC + (i64)b * stride_kcb + (i64)h * stride_kch + (i64)gid * KROW + tid * KBYTES;
    const u8* vc = VC + (i64)b * stride_vcb + (i64)h * stride_vch + (i64)(2 * tid) * VROW + gid * VBYTES;
    const int vgroup = gid * (D / 8) / VG;  /* the channel group of this lane's value coordinates */
    const u16* vs = VS + (i64)b * stride_vsb + (i64)h * stride_vsh + (i64)(2 * tid) * VSROW + vgroup;
    const u16* vz = VZ + (i64)b * stride_vsb + (i64)h * stride_vsh + (i64)(2 * tid) * VSROW + vgroup;
    const u8* mrow = MASK ? MASK + (i64)b * stride_mb : 0;
    const u32 kbase = key_base(lane), vbase = value_base(lane);
    const int last = end - 1;

    auto fetch = [&](RawA& r, int t0, bool clamp) {
        /* rows t0 + x, or (a partial tile) min(t0 + x, last) - min(t0 + gid + x, last) - gid keeps the lane's base */
        auto row = [&](int lane_row, int x) {
            return clamp ? (i64)(min(t0 + lane_row + x, last) - lane_row) : (i64)t0 + x;
        };
        load_bytes(kc + row(gid, 0) * KROW, r.k0, KBYTES);
        load_bytes(kc + row(gid, 8) * KROW, r.k1, KBYTES);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const i64 n = row(2 * tid, (i & 1) + 8 * (i >> 1));
            load_bytes(vc + n * VROW, r.v[i], VBYTES);
            r.vs[i] = __ldg(vs + n * VSROW);
            r.vz[i] = __ldg(vz + n * VSROW);
        }
    };
    auto step = [&](const RawA& r, int t0, bool full) {
        if (uniform(t0 / KG != group)) {  /* a new key group: rescale the query, read its bias */
            group = t0 / KG;
            if (uniform(group - zgroup >= BIAS_GROUPS)) {  /* the biases of groups zgroup .. zgroup + 15 */
                zgroup = group;
                const int glast = last / KG;
                const u16* z0 = kzb + (i64)min(group + gid, glast) * stride_ksg;
                const u16* z1 = kzb + (i64)min(group + gid + 8, glast) * stride_ksg;
                zc[0] = zc[1] = zc[2] = zc[3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < KSTEPS; ++kk)
                    mma_t<false>(zc, __ldg((const u32*)(z0 + key_coord(kk, 0))),
                                 __ldg((const u32*)(z1 + key_coord(kk, 0))), __ldg((const u32*)(z0 + key_coord(kk, 1))),
                                 __ldg((const u32*)(z1 + key_coord(kk, 1))), q16[kk][0], q16[kk][1]);
            }
            const int row = group - zgroup, src = (row & 7) * 4 + tid;  /* the lane holding row `row`, our heads */
            bias0 = __shfl_sync(0xffffffff, row < 8 ? zc[0] : zc[2], src);
            bias1 = __shfl_sync(0xffffffff, row < 8 ? zc[1] : zc[3], src);
            const u16* sp = ksb + (i64)group * stride_ksg;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
                for (int half = 0; half < 2; ++half)  /* the pair of coordinates key_coord(kk, half) */
                    qf[kk][half] = mul_half2(q16[kk][half], __ldg((const u32*)(sp + key_coord(kk, half))));
        }
        bool ok0, ok1;
        tile_mask(t0, full, gid, end, mrow, stride_mn, ok0, ok1);
        /* scores S^T [16 tokens x 8 heads] on the integer codes */
        u32 ka[KSTEPS][4];
        decode_keys(r.k0, r.k1, table, kbase, ka);
        float s[4];
        key_scores<false>(ka, qf, s);
        s[0] = ok0 ? (s[0] + bias0) * sm_scale_log2 : NEG_INF;
        s[1] = ok0 ? (s[1] + bias1) * sm_scale_log2 : NEG_INF;
        s[2] = ok1 ? (s[2] + bias0) * sm_scale_log2 : NEG_INF;
        s[3] = ok1 ? (s[3] + bias1) * sm_scale_log2 : NEG_INF;
        float a0, a1, p[4];
        online_softmax(s, m0, m1, l0, l1, a0, a1, p);
        const u32 pb0 = transpose8x8(pack2(p[0], p[1]));
        const u32 pb1 = transpose8x8(pack2(p[2], p[3]));
        /* values: decode, dequantize in registers (zero + code * scale of each token), O^T += V^T P^T */
        u32 va[VREGS][4];
        decode_values(r.v, table, vbase, va);
        const u32 sc01 = pair2(r.vs[0], r.vs[1]), zr01 = pair2(r.vz[0], r.vz[1]);
        const u32 sc89 = pair2(r.vs[2], r.vs[3]), zr89 = pair2(r.vz[2], r.vz[3]);
#pragma unroll
        for (int mt = 0; mt < VREGS; ++mt) {  /* a0, a1: tokens (2tid, 2tid+1); a2, a3: (2tid+8, 2tid+9) */
            va[mt][0] = fma2(va[mt][0], sc01, zr01); va[mt][1] = fma2(va[mt][1], sc01, zr01);
            va[mt][2] = fma2(va[mt][2], sc89, zr89); va[mt][3] = fma2(va[mt][3], sc89, zr89);
        }
        accumulate_pv(acc, va, a0, a1, pb0, pb1);
    };
    split_loop<RawA>(start, end, fetch, step);
    write_partials(M_OUT, L_OUT, ACC_OUT, (i64)bh * num_splits + split, G, gid, tid, m0, m1, l0, l1, acc);
}
"""
