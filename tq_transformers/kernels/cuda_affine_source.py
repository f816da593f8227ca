"""CUDA C++ source of the affine split kernel (KIVI: ``formats.ChannelAffinePacked`` keys, ``TokenAffinePacked``
values), on the codebook kernel's prelude (``cuda_source.PRELUDE``) and the same lane layout (``cuda_split``).

Extra placeholders: ``__KG__`` (tokens a key group) and ``__VG__`` (channels a value group). What differs from the
codebook kernel:

- codes decode through the byte table of the integers 0 .. 2^b - 1 (exact in 16 bits);
- keys: x_hat = zero[g, c] + code * scale[g, c] per channel c of token group g, so q . x_hat = (q * scale[g]) . code
  + q . zero[g]: at the first tile of each group the lane's query fragment is rescaled by its channels' scales (float32
  products rounded once to the model dtype) and the bias q . zero[g] is summed over the four lanes of a query head;
  the mma then runs on the integer codes;
- values: x_hat = zero[n, j] + code * scale[n, j] per token n and channel group j; a lane's D/8 coordinates lie in one
  channel group (VG a multiple of D/8), so each decoded pair is dequantized in registers with one fma on two 16-bit
  values (scale and zero rounded to the model dtype), then the mma as for codebook values.
"""

from .cuda_source import PRELUDE

AFFINE_SPLIT_SOURCE = PRELUDE + r"""
#define KG __KG__                 /* tokens a key group (a multiple of 16: a tile never straddles two groups) */
#define VG __VG__                 /* channels a value group (a multiple of D / 8) */
#define ROWK (D * KB / 8)         /* bytes of one token's key codes */

struct RawA { u32 k0[(KBYTES + 3) / 4], k1[(KBYTES + 3) / 4], v[4][(VBYTES + 3) / 4]; u16 vs[4], vz[4]; };

__device__ __forceinline__ void fetch_affine(RawA& r, int t0, int last, const u8* kc, i64 skg, const u8* vc,
                                             const u16* vs, const u16* vz, int svn, int svsn, int gid, int tid) {
    const int nk0 = min(t0 + gid, last), nk1 = min(t0 + gid + 8, last);  /* clamped into the split */
    load_bytes(kc + (i64)(nk0 / KG) * skg + (nk0 % KG) * ROWK, r.k0, KBYTES);
    load_bytes(kc + (i64)(nk1 / KG) * skg + (nk1 % KG) * ROWK, r.k1, KBYTES);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int n = min(t0 + 2 * tid + (i & 1) + 8 * (i >> 1), last);
        load_bytes(vc + (i64)n * svn, r.v[i], VBYTES);
        r.vs[i] = __ldg(vs + (i64)n * svsn);
        r.vz[i] = __ldg(vz + (i64)n * svsn);
    }
}

extern "C" __global__ void BOUNDS affine_split(
    const u16* Q, const u8* KC, const u16* KS, const u16* KZ, const u8* VC, const u16* VS, const u16* VZ,
    const u32* TABLE_K, const u32* TABLE_V, const u8* MASK, const i64* LENS,
    float* M_OUT, float* L_OUT, float* ACC_OUT,
    int n_q, int tokens_per_split, int num_splits, int num_heads, int G,
    int stride_kcb, int stride_kch, int stride_kcg, int stride_ksb, int stride_ksh, int stride_ksg,
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

    /* the query (head gid, coordinates tid*D/4 + 4ks + {0,1} and {2,3}) as loaded; qf = it times the group's scales */
    u32 qraw[KSTEPS][2], qf[KSTEPS][2];
    const bool head_ok = gid < G;
    const u16* qrow = Q + ((i64)bh * G + (head_ok ? gid : 0)) * D + tid * (D / 4);
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
        uint2 v = *(const uint2*)(qrow + 4 * ks);
        qraw[ks][0] = head_ok ? v.x : 0u;
        qraw[ks][1] = head_ok ? v.y : 0u;
    }
    const u16* ksb = KS + (i64)b * stride_ksb + (i64)h * stride_ksh + tid * (D / 4);
    const u16* kzb = KZ + (i64)b * stride_ksb + (i64)h * stride_ksh + tid * (D / 4);
    int group = -1;
    float bias0 = 0.f, bias1 = 0.f;  /* q . zero[group] of heads 2tid, 2tid+1 (the S^T columns) */

    float acc[VREGS][4];
#pragma unroll
    for (int i = 0; i < VREGS; ++i) { acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f; }
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;

    const u8* kc = KC + (i64)b * stride_kcb + (i64)h * stride_kch + tid * KBYTES;
    const u8* vc = VC + (i64)b * stride_vcb + (i64)h * stride_vch + gid * VBYTES;
    const int vgroup = gid * (D / 8) / VG;  /* the channel group of this lane's value coordinates */
    const u16* vs = VS + (i64)b * stride_vsb + (i64)h * stride_vsh + vgroup;
    const u16* vz = VZ + (i64)b * stride_vsb + (i64)h * stride_vsh + vgroup;
    const u8* mrow = MASK ? MASK + (i64)b * stride_mb : 0;

    const int last = end - 1;
    RawA cur, nxt;
#if PREFETCH
    if (start < end) fetch_affine(cur, start, last, kc, stride_kcg, vc, vs, vz, stride_vcn, stride_vsn, gid, tid);
#endif
    for (int t0 = start; t0 < end; t0 += 16) {
#if PREFETCH
        if (t0 + 16 < end)
            fetch_affine(nxt, t0 + 16, last, kc, stride_kcg, vc, vs, vz, stride_vcn, stride_vsn, gid, tid);
#else
        fetch_affine(cur, t0, last, kc, stride_kcg, vc, vs, vz, stride_vcn, stride_vsn, gid, tid);
#endif
        if (t0 / KG != group) {  /* a new key group (warp-uniform): rescale the query, new bias */
            group = t0 / KG;
            const u16* sp = ksb + (i64)group * stride_ksg;
            const u16* zp = kzb + (i64)group * stride_ksg;
            float part = 0.f;
#pragma unroll
            for (int ks = 0; ks < KSTEPS; ++ks) {
                const uint2 sv = __ldg((const uint2*)(sp + 4 * ks));
                const uint2 zv = __ldg((const uint2*)(zp + 4 * ks));
                const float q0 = lo_float(qraw[ks][0]), q1 = hi_float(qraw[ks][0]);
                const float q2 = lo_float(qraw[ks][1]), q3 = hi_float(qraw[ks][1]);
                part += q0 * half_to_float((u16)(zv.x & 0xffff)) + q1 * half_to_float((u16)(zv.x >> 16))
                      + q2 * half_to_float((u16)(zv.y & 0xffff)) + q3 * half_to_float((u16)(zv.y >> 16));
                qf[ks][0] = pack2(q0 * half_to_float((u16)(sv.x & 0xffff)), q1 * half_to_float((u16)(sv.x >> 16)));
                qf[ks][1] = pack2(q2 * half_to_float((u16)(sv.y & 0xffff)), q3 * half_to_float((u16)(sv.y >> 16)));
            }
            part += __shfl_xor_sync(0xffffffff, part, 1);
            part += __shfl_xor_sync(0xffffffff, part, 2);
            bias0 = __shfl_sync(0xffffffff, part, (2 * tid) * 4);
            bias1 = __shfl_sync(0xffffffff, part, (2 * tid + 1) * 4);
        }
        bool ok0, ok1;
        tile_mask(t0, gid, end, mrow, stride_mn, ok0, ok1);
        /* scores S^T [16 tokens x 8 heads] on the integer codes */
        u32 k0[KREGS], k1[KREGS];
        decode<KBYTES, KWORDS, KREPL>(cur.k0, tk, lane, k0);
        decode<KBYTES, KWORDS, KREPL>(cur.k1, tk, lane, k1);
        float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk)
            mma((TWO_CHAINS && (kk & 1)) ? s2 : s, k0[2 * kk], k1[2 * kk], k0[2 * kk + 1], k1[2 * kk + 1],
                qf[kk][0], qf[kk][1]);
#pragma unroll
        for (int i = 0; i < 4; ++i) s[i] += s2[i];
        s[0] = ok0 ? (s[0] + bias0) * sm_scale_log2 : NEG_INF;
        s[1] = ok0 ? (s[1] + bias1) * sm_scale_log2 : NEG_INF;
        s[2] = ok1 ? (s[2] + bias0) * sm_scale_log2 : NEG_INF;
        s[3] = ok1 ? (s[3] + bias1) * sm_scale_log2 : NEG_INF;
        float a0, a1, p[4];
        online_softmax(s, m0, m1, l0, l1, a0, a1, p);
        const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
        const u32 pb0 = transpose8x8(pack2(p0, p1));
        const u32 pb1 = transpose8x8(pack2(p2, p3));
        /* values: decode, dequantize in registers (zero + code * scale of each token), O^T += V^T P^T */
        u32 v[4][VREGS];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            decode<VBYTES, VWORDS, VREPL>(cur.v[i], tv, lane, v[i]);
            const u32 sc = broadcast2(cur.vs[i]), zr = broadcast2(cur.vz[i]);
#pragma unroll
            for (int mt = 0; mt < VREGS; ++mt) v[i][mt] = fma2(v[i][mt], sc, zr);
        }
        accumulate_pv(acc, v, a0, a1, pb0, pb1);
#if PREFETCH
        cur = nxt;
#endif
    }
    write_partials(M_OUT, L_OUT, ACC_OUT, (i64)bh * num_splits + split, G, gid, tid, m0, m1, l0, l1, acc);
}
"""
