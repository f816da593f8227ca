"""CUDA C++ source of the codebook split kernel (``cuda_split``; TurboQuant and Bonsai keys and values), on the shared
prelude (``cuda_prelude``), kept apart from its launcher, with its cp.async staging ring.

Its own placeholder: ``__RING__`` (stages of the staging ring, 0: tiles loaded into registers), filled by
``cuda_split._source`` like the prelude's.
"""

from .cuda_prelude import PRELUDE

CODEBOOK_SPLIT_SOURCE = PRELUDE + r"""
/* one tile's raw bytes and scales for this lane: key rows gid, gid + 8; value rows 2tid, 2tid+1, 2tid+8, 2tid+9 */
struct Raw { u32 k0[(KBYTES + 3) / 4], k1[(KBYTES + 3) / 4], v[4][(VBYTES + 3) / 4]; u16 kn0, kn1, vn0, vn1; };

/* Staging (RING > 0): each warp owns a ring of RING tiles in shared memory after the table (TABLE_BYTES: 64 KiB, 32
   KiB with SHARED_TABLE; cuda_split.shared_bytes counts the same). A whole tile is copied in with 16-byte cp.async
   chunks spread over the warp's lanes (its key rows, value rows and 16 + 16 scales are each contiguous in the cache),
   RING - 1 tiles ahead of the one decoded; the lanes then read their bytes back. Value rows of 32 bytes or more have
   their 16-byte chunks XOR-swizzled by row pair, so that the four rows 2tid + x a read touches fall in different
   banks. */
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
