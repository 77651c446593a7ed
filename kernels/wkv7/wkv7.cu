// wkv7 recurrence (RWKV-7 "x070"), forward and backward, head size 64, bf16 in/out, fp32 state.
//
// Contract (matches rwkv7/wkv.py, wkv7_reference): for each batch b, head h, step t, with S [64x64] fp32
// (row i = value channel, column j = key channel) and decay_j = exp(-exp(-0.5) * sigmoid(w_j)) in fp32:
//     sa_i = sum_j S_ij a_j ;  S_ij = S_ij decay_j + sa_i b_j + v_i k_j ;  y_i = sum_j S_ij r_j
// Inputs r, w, k, v, a, b: bf16 [B,T,H,64] contiguous, T a multiple of 16. Optional initial state s0 and final-state
// gradient dsT: fp32 [B,H,64,64]. One thread block per (b, h); every output element is written exactly once.
//
// Forward: LC threads share one state row (each owns 64/LC columns), so both reductions (sa, y) are LC-lane shuffles
// and a step needs no block barrier. Inputs arrive in 16-step chunks staged to shared memory (the next chunk is
// prefetched into registers while the current one runs). The state is checkpointed after every chunk ("ckpt",
// [B,H,T/16,64,64]) and sa saved ([B,T,H,64] fp32) for the backward; without save_all only the final state is kept.
//
// Backward walks t = T-1..0. A thread (i, p) keeps column i of S (rows J_p), row i of dS and column i of dS, so the
// five key-channel reductions and the two value-channel reductions are all LC-lane shuffles; one barrier per step
// shares d(sa). S_{t-1} comes from inverting the step, S_{t-1} = (S_t - v k^T - sa b^T) diag(1/decay), restarted
// from the exact checkpoint every 16 steps (decay >= 0.545, so 15 inversions amplify rounding by well under 1e4x
// of fp32 epsilon). No atomics: results are bit-for-bit reproducible.
//
// Column ownership: thread p of a row owns key channels j = 4p + 4*LC*q + e (q < 64/(4LC), e < 4), so a float4 load
// by the LC lanes of a row reads one contiguous run of shared memory (no bank conflicts; rows broadcast).

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int N = 64;       // head size
constexpr int CH = 16;      // chunk length: staging and checkpoint interval
constexpr float DECAY_SCALE = 0.60653065971263342f;  // exp(-0.5)
constexpr unsigned FULL = 0xffffffffu;

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float sigmoidf_(float z) { return 1.0f / (1.0f + __expf(-z)); }

__device__ __forceinline__ void bf8_to_f32(const uint4& u, float* out) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        float2 f = __bfloat1622float2(h[m]);
        out[2 * m] = f.x;
        out[2 * m + 1] = f.y;
    }
}

// Sum over the LC lanes of a row; every lane gets the total.
template <int LC>
__device__ __forceinline__ float row_allreduce(float x) {
#pragma unroll
    for (int m = 1; m < LC; m <<= 1) x += __shfl_xor_sync(FULL, x, m);
    return x;
}

// Reduce four quantities over the LC lanes of a row, spreading the results instead of copying them:
// LC == 2: lane p holds quantities 2p, 2p+1 (o0, o1). LC >= 4: lane p holds quantity qidx(p) in o0.
template <int LC>
__device__ __forceinline__ void reduce4(float q0, float q1, float q2, float q3, int p, float& o0, float& o1) {
    const bool hi = p & 1;
    float u0 = (hi ? q2 : q0) + __shfl_xor_sync(FULL, hi ? q0 : q2, 1);
    float u1 = (hi ? q3 : q1) + __shfl_xor_sync(FULL, hi ? q1 : q3, 1);
    if constexpr (LC == 2) {
        o0 = u0;
        o1 = u1;
    } else {
        const bool hi2 = (p >> 1) & 1;
        float w = (hi2 ? u1 : u0) + __shfl_xor_sync(FULL, hi2 ? u0 : u1, 2);
#pragma unroll
        for (int m = 4; m < LC; m <<= 1) w += __shfl_xor_sync(FULL, w, m);
        o0 = w;
        o1 = 0.0f;
    }
}

template <int LC>
__device__ __forceinline__ int reduce4_qidx(int p) { return LC == 2 ? 2 * p : 2 * (p & 1) + ((p >> 1) & 1); }

// dot of this thread's CPT state entries with a shared-memory vector, four accumulators for ILP.
template <int LC>
__device__ __forceinline__ float dot_cols(const float* x, const float* vec, int p) {
    constexpr int NQ = N / LC / 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
        const float4 v = *reinterpret_cast<const float4*>(vec + 4 * p + 4 * LC * q);
        acc[0] = fmaf(x[4 * q + 0], v.x, acc[0]);
        acc[1] = fmaf(x[4 * q + 1], v.y, acc[1]);
        acc[2] = fmaf(x[4 * q + 2], v.z, acc[2]);
        acc[3] = fmaf(x[4 * q + 3], v.w, acc[3]);
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

__device__ __forceinline__ int col_of(int p, int q, int e, int LC) { return 4 * p + 4 * LC * q + e; }

// ------------------------------------------------------------------------------------------------ forward

template <int LC>
__global__ void __launch_bounds__(64 * LC, (LC <= 4 ? 2 : 1))
wkv7_fwd_kernel(int T, int H, const bf16* __restrict__ r_, const bf16* __restrict__ w_, const bf16* __restrict__ k_,
                const bf16* __restrict__ v_, const bf16* __restrict__ a_, const bf16* __restrict__ b_,
                const float* __restrict__ s0_, bf16* __restrict__ y_, float* __restrict__ ckpt_,
                float* __restrict__ sa_, int save_all) {
    constexpr int NT = 64 * LC, CPT = N / LC, NQ = CPT / 4;
    constexpr int G = NT / 128;                 // groups of 128 threads; each group stages whole tensors
    constexpr int NX = 6, PF = (NX + G - 1) / G;
    __shared__ __align__(16) float sh_in[NX][CH][N];  // r, decay, k, v, a, b
    __shared__ __align__(16) float sh_sa[CH][N];
    __shared__ __align__(16) bf16 sh_y[CH][N];

    const int tid = threadIdx.x, i = tid / LC, p = tid % LC;
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H;
    const int NC = T / CH;
    const int g = tid / 128, vi = tid % 128, vtt = vi / 8, vc8 = vi % 8;

    float S[CPT];
    if (s0_ != nullptr) {
        const float* s0 = s0_ + (size_t)bh * N * N + i * N;
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
            const float4 x = *reinterpret_cast<const float4*>(s0 + col_of(p, q, 0, LC));
            S[4 * q] = x.x; S[4 * q + 1] = x.y; S[4 * q + 2] = x.z; S[4 * q + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int c = 0; c < CPT; ++c) S[c] = 0.0f;
    }

    uint4 pf[PF];
    auto issue = [&](int c) {
        const size_t off = ((size_t)(bb * T + c * CH + vtt) * H + hh) * N + vc8 * 8;
#pragma unroll
        for (int u = 0; u < PF; ++u) {
            const int x = g + G * u;
            if (x < NX) {
                const bf16* src = x == 0 ? r_ : x == 1 ? w_ : x == 2 ? k_ : x == 3 ? v_ : x == 4 ? a_ : b_;
                pf[u] = *reinterpret_cast<const uint4*>(src + off);
            }
        }
    };
    auto commit = [&]() {
#pragma unroll
        for (int u = 0; u < PF; ++u) {
            const int x = g + G * u;
            if (x < NX) {
                float f[8];
                bf8_to_f32(pf[u], f);
                if (x == 1) {
#pragma unroll
                    for (int m = 0; m < 8; ++m) f[m] = __expf(-DECAY_SCALE * sigmoidf_(f[m]));
                }
                float4* dst = reinterpret_cast<float4*>(&sh_in[x][vtt][vc8 * 8]);
                dst[0] = make_float4(f[0], f[1], f[2], f[3]);
                dst[1] = make_float4(f[4], f[5], f[6], f[7]);
            }
        }
    };

    issue(0);
    commit();
    __syncthreads();

    for (int c = 0; c < NC; ++c) {
        if (c + 1 < NC) issue(c + 1);
#pragma unroll 4
        for (int tt = 0; tt < CH; ++tt) {
            float sa = row_allreduce<LC>(dot_cols<LC>(S, sh_in[4][tt], p));
            const float v_i = sh_in[3][tt][i];
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int j = col_of(p, q, 0, LC);
                const float4 d = *reinterpret_cast<const float4*>(&sh_in[1][tt][j]);
                const float4 bv = *reinterpret_cast<const float4*>(&sh_in[5][tt][j]);
                const float4 kv = *reinterpret_cast<const float4*>(&sh_in[2][tt][j]);
                S[4 * q + 0] = fmaf(S[4 * q + 0], d.x, fmaf(sa, bv.x, v_i * kv.x));
                S[4 * q + 1] = fmaf(S[4 * q + 1], d.y, fmaf(sa, bv.y, v_i * kv.y));
                S[4 * q + 2] = fmaf(S[4 * q + 2], d.z, fmaf(sa, bv.z, v_i * kv.z));
                S[4 * q + 3] = fmaf(S[4 * q + 3], d.w, fmaf(sa, bv.w, v_i * kv.w));
            }
            const float y = row_allreduce<LC>(dot_cols<LC>(S, sh_in[0][tt], p));
            if (p == 0) {
                sh_y[tt][i] = __float2bfloat16_rn(y);
                sh_sa[tt][i] = sa;
            }
        }
        // checkpoint: every chunk when training, else only the final state
        if (save_all || c == NC - 1) {
            float* dst = ckpt_ + ((size_t)bh * (save_all ? NC : 1) + (save_all ? c : 0)) * N * N + i * N;
#pragma unroll
            for (int q = 0; q < NQ; ++q)
                *reinterpret_cast<float4*>(dst + col_of(p, q, 0, LC)) =
                    make_float4(S[4 * q], S[4 * q + 1], S[4 * q + 2], S[4 * q + 3]);
        }
        __syncthreads();  // sh_y / sh_sa complete; everyone is done reading sh_in
        if (tid < 128) {
            const size_t off = ((size_t)(bb * T + c * CH + vtt) * H + hh) * N + vc8 * 8;
            *reinterpret_cast<uint4*>(y_ + off) = *reinterpret_cast<const uint4*>(&sh_y[vtt][vc8 * 8]);
        }
        if (save_all) {
            for (int x = tid; x < CH * N / 4; x += NT) {
                const int tt = x / 16, c4 = x % 16;
                const size_t off = ((size_t)(bb * T + c * CH + tt) * H + hh) * N + c4 * 4;
                *reinterpret_cast<float4*>(sa_ + off) = *reinterpret_cast<const float4*>(&sh_sa[tt][c4 * 4]);
            }
        }
        if (c + 1 < NC) commit();
        __syncthreads();
    }
}

// ------------------------------------------------------------------------------------------------ backward

// staged per chunk (floats): r, decay, k, v, a, b, dy, dw-factor, sa
enum { IR = 0, ID, IK, IV, IA, IB, IDY, IWF, ISA, NIN };
// output buffer order (bf16): dr, dw, dk, dv, da, db
enum { OR_ = 0, OW, OK, OV, OA, OB, NOUT };

template <int LC>
struct BwdSmem {
    float in[NIN][CH][N];
    float dsa[2][N];
    bf16 out[NOUT][CH][N];
};

template <int LC>
__global__ void __launch_bounds__(64 * LC, (LC <= 4 ? 2 : 1))
wkv7_bwd_kernel(int T, int H, const bf16* __restrict__ r_, const bf16* __restrict__ w_, const bf16* __restrict__ k_,
                const bf16* __restrict__ v_, const bf16* __restrict__ a_, const bf16* __restrict__ b_,
                const bf16* __restrict__ dy_, const float* __restrict__ ckpt_, const float* __restrict__ sa_,
                const float* __restrict__ dsT_, bf16* __restrict__ dr_, bf16* __restrict__ dw_,
                bf16* __restrict__ dk_, bf16* __restrict__ dv_, bf16* __restrict__ da_, bf16* __restrict__ db_,
                float* __restrict__ ds0_) {
    constexpr int NT = 64 * LC, CPT = N / LC, NQ = CPT / 4;
    constexpr int G = NT / 128;
    constexpr int NX = 9, PF = (NX + G - 1) / G;  // 7 bf16 tensors + sa (fp32: two 128-vector halves)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    BwdSmem<LC>& sm = *reinterpret_cast<BwdSmem<LC>*>(smem_raw);

    const int tid = threadIdx.x, i = tid / LC, p = tid % LC;
    const int bh = blockIdx.x, bb = bh / H, hh = bh % H;
    const int NC = T / CH;
    const int g = tid / 128, vi = tid % 128;
    const float* ckpt = ckpt_ + (size_t)bh * NC * N * N;

    float ST[CPT], dS[CPT], dST[CPT], ckpf[CPT];
    if (dsT_ != nullptr) {
        const float* ds = dsT_ + (size_t)bh * N * N;
#pragma unroll
        for (int q = 0; q < NQ; ++q) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = col_of(p, q, e, LC);
                dS[4 * q + e] = ds[i * N + j];
                dST[4 * q + e] = ds[j * N + i];
            }
        }
    } else {
#pragma unroll
        for (int c = 0; c < CPT; ++c) dS[c] = dST[c] = 0.0f;
    }

    uint4 pf[PF];
    auto issue = [&](int c) {
#pragma unroll
        for (int u = 0; u < PF; ++u) {
            const int x = g + G * u;
            if (x < 7) {
                const bf16* src = x == 0 ? r_ : x == 1 ? w_ : x == 2 ? k_ : x == 3 ? v_ : x == 4 ? a_ : x == 5 ? b_ : dy_;
                const size_t off = ((size_t)(bb * T + c * CH + vi / 8) * H + hh) * N + (vi % 8) * 8;
                pf[u] = *reinterpret_cast<const uint4*>(src + off);
            } else if (x < NX) {
                const int tt = (x - 7) * 8 + vi / 16;
                const size_t off = ((size_t)(bb * T + c * CH + tt) * H + hh) * N + (vi % 16) * 4;
                pf[u] = *reinterpret_cast<const uint4*>(sa_ + off);
            }
        }
#pragma unroll
        for (int q = 0; q < NQ; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) ckpf[4 * q + e] = ckpt[(size_t)c * N * N + col_of(p, q, e, LC) * N + i];
    };
    auto commit = [&]() {
#pragma unroll
        for (int u = 0; u < PF; ++u) {
            const int x = g + G * u;
            if (x < 7) {
                const int tt = vi / 8, c8 = (vi % 8) * 8;
                float f[8];
                bf8_to_f32(pf[u], f);
                const int slot = x == 6 ? IDY : x;  // r, w->decay, k, v, a, b keep their index
                if (x == 1) {
                    float wf[8];
#pragma unroll
                    for (int m = 0; m < 8; ++m) {
                        const float s = sigmoidf_(f[m]);
                        f[m] = __expf(-DECAY_SCALE * s);
                        wf[m] = -DECAY_SCALE * f[m] * s * (1.0f - s);  // d decay / d w
                    }
                    float4* dw = reinterpret_cast<float4*>(&sm.in[IWF][tt][c8]);
                    dw[0] = make_float4(wf[0], wf[1], wf[2], wf[3]);
                    dw[1] = make_float4(wf[4], wf[5], wf[6], wf[7]);
                }
                float4* dst = reinterpret_cast<float4*>(&sm.in[slot][tt][c8]);
                dst[0] = make_float4(f[0], f[1], f[2], f[3]);
                dst[1] = make_float4(f[4], f[5], f[6], f[7]);
            } else if (x < NX) {
                const int tt = (x - 7) * 8 + vi / 16;
                *reinterpret_cast<uint4*>(&sm.in[ISA][tt][(vi % 16) * 4]) = pf[u];
            }
        }
    };
    auto put = [&](int slot, int tt, float val) { sm.out[slot][tt][i] = __float2bfloat16_rn(val); };

    issue(NC - 1);
    commit();
    __syncthreads();

    for (int c = NC - 1; c >= 0; --c) {
#pragma unroll
        for (int m = 0; m < CPT; ++m) ST[m] = ckpf[m];  // S after the chunk's last step
        if (c > 0) issue(c - 1);

#pragma unroll 1
        for (int tt = CH - 1; tt >= 0; --tt) {
            const float r_i = sm.in[IR][tt][i], d_i = sm.in[ID][tt][i], k_i = sm.in[IK][tt][i];
            const float a_i = sm.in[IA][tt][i], b_i = sm.in[IB][tt][i], dy_i = sm.in[IDY][tt][i];

            // dr uses S_t (column i)
            const float dr = dot_cols<LC>(ST, sm.in[IDY][tt], p);
            // dS_t += dy r^T, in both the row copy and the column copy
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int j = col_of(p, q, 0, LC);
                const float4 rv = *reinterpret_cast<const float4*>(&sm.in[IR][tt][j]);
                const float4 dyv = *reinterpret_cast<const float4*>(&sm.in[IDY][tt][j]);
                dS[4 * q + 0] = fmaf(dy_i, rv.x, dS[4 * q + 0]);
                dS[4 * q + 1] = fmaf(dy_i, rv.y, dS[4 * q + 1]);
                dS[4 * q + 2] = fmaf(dy_i, rv.z, dS[4 * q + 2]);
                dS[4 * q + 3] = fmaf(dy_i, rv.w, dS[4 * q + 3]);
                dST[4 * q + 0] = fmaf(dyv.x, r_i, dST[4 * q + 0]);
                dST[4 * q + 1] = fmaf(dyv.y, r_i, dST[4 * q + 1]);
                dST[4 * q + 2] = fmaf(dyv.z, r_i, dST[4 * q + 2]);
                dST[4 * q + 3] = fmaf(dyv.w, r_i, dST[4 * q + 3]);
            }
            // group A: dsa_i, dv_i (row i of dS), dk_i, db_i (column i of dS)
            {
                float o0, o1;
                reduce4<LC>(dot_cols<LC>(dS, sm.in[IB][tt], p), dot_cols<LC>(dS, sm.in[IK][tt], p),
                            dot_cols<LC>(dST, sm.in[IV][tt], p), dot_cols<LC>(dST, sm.in[ISA][tt], p), p, o0, o1);
                const int qa = reduce4_qidx<LC>(p);
                if (LC == 2 || (p >> 2) == 0) {
                    // quantity index -> destination: 0 dsa (shared), 1 dv, 2 dk, 3 db
                    if (qa == 0) sm.dsa[tt & 1][i] = o0;
                    else if (qa == 1) put(OV, tt, o0);
                    else if (qa == 2) put(OK, tt, o0);
                    else put(OB, tt, o0);
                    if (LC == 2) {
                        if (qa + 1 == 1) put(OV, tt, o1);
                        else put(OB, tt, o1);
                    }
                }
            }
            // S_{t-1} column i = (S_t - v k_i - sa b_i) / decay_i
            {
                const float inv = 1.0f / d_i, kin = k_i * inv, bin = b_i * inv;
#pragma unroll
                for (int q = 0; q < NQ; ++q) {
                    const int j = col_of(p, q, 0, LC);
                    const float4 vv = *reinterpret_cast<const float4*>(&sm.in[IV][tt][j]);
                    const float4 sv = *reinterpret_cast<const float4*>(&sm.in[ISA][tt][j]);
                    ST[4 * q + 0] = fmaf(-sv.x, bin, fmaf(-vv.x, kin, ST[4 * q + 0] * inv));
                    ST[4 * q + 1] = fmaf(-sv.y, bin, fmaf(-vv.y, kin, ST[4 * q + 1] * inv));
                    ST[4 * q + 2] = fmaf(-sv.z, bin, fmaf(-vv.z, kin, ST[4 * q + 2] * inv));
                    ST[4 * q + 3] = fmaf(-sv.w, bin, fmaf(-vv.w, kin, ST[4 * q + 3] * inv));
                }
            }
            float dd;
            {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int m = 0; m < CPT; ++m) acc[m & 3] = fmaf(dST[m], ST[m], acc[m & 3]);
                dd = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            }
            __syncthreads();  // dsa of every row is visible
            const float dsa_i = sm.dsa[tt & 1][i];
            const float da = dot_cols<LC>(ST, sm.dsa[tt & 1], p);
            {
                float o0, o1;
                reduce4<LC>(dr, dd, da, 0.0f, p, o0, o1);
                const int qb = reduce4_qidx<LC>(p);
                const float wf_i = sm.in[IWF][tt][i];
                if (LC == 2 || (p >> 2) == 0) {
                    // quantity index -> destination: 0 dr, 1 dw, 2 da, 3 unused
                    if (qb == 0) put(OR_, tt, o0);
                    else if (qb == 1) put(OW, tt, o0 * wf_i);
                    else if (qb == 2) put(OA, tt, o0);
                    if (LC == 2 && qb == 0) put(OW, tt, o1 * wf_i);
                }
            }
            // dS_{t-1} = G diag(decay) + dsa a^T (row i and column i)
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                const int j = col_of(p, q, 0, LC);
                const float4 dv4 = *reinterpret_cast<const float4*>(&sm.in[ID][tt][j]);
                const float4 av = *reinterpret_cast<const float4*>(&sm.in[IA][tt][j]);
                const float4 ds = *reinterpret_cast<const float4*>(&sm.dsa[tt & 1][j]);
                dS[4 * q + 0] = fmaf(dS[4 * q + 0], dv4.x, dsa_i * av.x);
                dS[4 * q + 1] = fmaf(dS[4 * q + 1], dv4.y, dsa_i * av.y);
                dS[4 * q + 2] = fmaf(dS[4 * q + 2], dv4.z, dsa_i * av.z);
                dS[4 * q + 3] = fmaf(dS[4 * q + 3], dv4.w, dsa_i * av.w);
                dST[4 * q + 0] = fmaf(dST[4 * q + 0], d_i, ds.x * a_i);
                dST[4 * q + 1] = fmaf(dST[4 * q + 1], d_i, ds.y * a_i);
                dST[4 * q + 2] = fmaf(dST[4 * q + 2], d_i, ds.z * a_i);
                dST[4 * q + 3] = fmaf(dST[4 * q + 3], d_i, ds.w * a_i);
            }
        }
        __syncthreads();  // out buffer complete; sm.in no longer read
        for (int x = tid; x < NOUT * 128; x += NT) {
            const int o = x / 128, vv = x % 128, tt = vv / 8, c8 = (vv % 8) * 8;
            bf16* dst = o == OR_ ? dr_ : o == OW ? dw_ : o == OK ? dk_ : o == OV ? dv_ : o == OA ? da_ : db_;
            const size_t off = ((size_t)(bb * T + c * CH + tt) * H + hh) * N + c8;
            *reinterpret_cast<uint4*>(dst + off) = *reinterpret_cast<const uint4*>(&sm.out[o][tt][c8]);
        }
        if (c > 0) commit();
        __syncthreads();
    }
    // gradient of the initial state: dS after step 0, row i
    float* ds0 = ds0_ + (size_t)bh * N * N + i * N;
#pragma unroll
    for (int q = 0; q < NQ; ++q)
        *reinterpret_cast<float4*>(ds0 + col_of(p, q, 0, LC)) =
            make_float4(dS[4 * q], dS[4 * q + 1], dS[4 * q + 2], dS[4 * q + 3]);
}

template <int LC>
cudaError_t launch_fwd(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                       const void* a, const void* b, const float* s0, void* y, float* ckpt, float* sa, bool save_all,
                       cudaStream_t stream) {
    wkv7_fwd_kernel<LC><<<B * H, 64 * LC, 0, stream>>>(
        T, H, (const bf16*)r, (const bf16*)w, (const bf16*)k, (const bf16*)v, (const bf16*)a, (const bf16*)b, s0,
        (bf16*)y, ckpt, sa, save_all ? 1 : 0);
    return cudaGetLastError();
}

template <int LC>
cudaError_t launch_bwd(int B, int T, int H, const void* r, const void* w, const void* k, const void* v,
                       const void* a, const void* b, const void* dy, const float* ckpt, const float* sa,
                       const float* dsT, void* dr, void* dw, void* dk, void* dv, void* da, void* db, float* ds0,
                       cudaStream_t stream) {
    const int smem = (int)sizeof(BwdSmem<LC>);
    // above 48 KB a kernel must opt in; cheap enough to repeat per launch (per device, too)
    cudaError_t err = cudaFuncSetAttribute(wkv7_bwd_kernel<LC>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    wkv7_bwd_kernel<LC><<<B * H, 64 * LC, smem, stream>>>(
        T, H, (const bf16*)r, (const bf16*)w, (const bf16*)k, (const bf16*)v, (const bf16*)a, (const bf16*)b,
        (const bf16*)dy, ckpt, sa, dsT, (bf16*)dr, (bf16*)dw, (bf16*)dk, (bf16*)dv, (bf16*)da, (bf16*)db, ds0);
    return cudaGetLastError();
}

}  // namespace

// Entry points for the binding (wkv7_op.cpp). lanes = threads per state row (2, 4 or 8).
cudaError_t wkv7_forward_cuda(int lanes, int B, int T, int H, const void* r, const void* w, const void* k,
                              const void* v, const void* a, const void* b, const float* s0, void* y, float* ckpt,
                              float* sa, bool save_all, cudaStream_t stream) {
    switch (lanes) {
        case 2: return launch_fwd<2>(B, T, H, r, w, k, v, a, b, s0, y, ckpt, sa, save_all, stream);
        case 4: return launch_fwd<4>(B, T, H, r, w, k, v, a, b, s0, y, ckpt, sa, save_all, stream);
        case 8: return launch_fwd<8>(B, T, H, r, w, k, v, a, b, s0, y, ckpt, sa, save_all, stream);
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t wkv7_backward_cuda(int lanes, int B, int T, int H, const void* r, const void* w, const void* k,
                               const void* v, const void* a, const void* b, const void* dy, const float* ckpt,
                               const float* sa, const float* dsT, void* dr, void* dw, void* dk, void* dv, void* da,
                               void* db, float* ds0, cudaStream_t stream) {
    switch (lanes) {
        case 2: return launch_bwd<2>(B, T, H, r, w, k, v, a, b, dy, ckpt, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        case 4: return launch_bwd<4>(B, T, H, r, w, k, v, a, b, dy, ckpt, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        case 8: return launch_bwd<8>(B, T, H, r, w, k, v, a, b, dy, ckpt, sa, dsT, dr, dw, dk, dv, da, db, ds0, stream);
        default: return cudaErrorInvalidValue;
    }
}
