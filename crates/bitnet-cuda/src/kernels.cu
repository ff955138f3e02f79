// bitnet-cuda kernels. Compiled at run time by NVRTC (no headers: every helper is defined here
// or is an NVRTC builtin) with --fmad=false, so that a float expression written in the same
// order as the CPU reference rounds exactly as it does there (no contraction into FMAs).
//
// The host prepends `#define KV_F16 0|1` (the KV-cache element type of the precision plan).
//
// Conventions: token rows are `[n][stride]`; every index that can pass 2^31 is 64-bit; kernels
// that need it take their block size from the host (multiples of 32).

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Programmatic dependent launch (sm_90): every kernel is launched allowed to start before the
// previous one on the stream has finished (gpu.rs), so each waits here, before reading
// anything, until that kernel's grid has completed and its writes are visible, then lets the
// next kernel launch (its blocks wait in turn). A decode step is ~300 short kernels: this hides
// most of the launch gap between them. Without the launch attribute the wait returns at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_WAIT()                                                  \
    do {                                                            \
        asm volatile("griddepcontrol.wait;" ::: "memory");          \
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); \
    } while (0)
#else
#define PDL_WAIT() \
    do {           \
    } while (0)
#endif

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

#if KV_F16
typedef u16 kv_t;
#else
typedef float kv_t;
#endif

// ---------------------------------------------------------------------------------------------
// helpers

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float kv_load(const kv_t* p) {
#if KV_F16
    return f16_to_f32(*p);
#else
    return *p;
#endif
}

__device__ __forceinline__ kv_t kv_from_f32(float v) {
#if KV_F16
    return f32_to_f16(v);
#else
    return v;
#endif
}

__device__ __forceinline__ float warp_sum_f(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_max_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Each may be called repeatedly in one kernel: the leading barrier protects the scratch.
__device__ double block_sum_d(double v) {
    __shared__ double s_red_d[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) s_red_d[w] = v;
    __syncthreads();
    if (w == 0) {
        double t = lane < nw ? s_red_d[lane] : 0.0;
        t = warp_sum_d(t);
        if (lane == 0) s_red_d[0] = t;
    }
    __syncthreads();
    return s_red_d[0];
}

__device__ float block_sum_f(float v) {
    __shared__ float s_red_f[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_f(v);
    __syncthreads();
    if (lane == 0) s_red_f[w] = v;
    __syncthreads();
    if (w == 0) {
        float t = lane < nw ? s_red_f[lane] : 0.0f;
        t = warp_sum_f(t);
        if (lane == 0) s_red_f[0] = t;
    }
    __syncthreads();
    return s_red_f[0];
}

__device__ int block_sum_i(int v) {
    __shared__ int s_red_i[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_i(v);
    __syncthreads();
    if (lane == 0) s_red_i[w] = v;
    __syncthreads();
    if (w == 0) {
        int t = lane < nw ? s_red_i[lane] : 0;
        t = warp_sum_i(t);
        if (lane == 0) s_red_i[0] = t;
    }
    __syncthreads();
    return s_red_i[0];
}

// BitNet's activation quantization of one value, as QuantActs::store_row:
// round_half_even(clamp(y, -128, 127)), NaN -> 0. `y` is `x * s`, computed by the caller.
__device__ __forceinline__ int quant_i8(float y) {
    if (y != y) return 0;
    return (int)rintf(fminf(fmaxf(y, -128.0f), 127.0f));
}

// ---------------------------------------------------------------------------------------------
// embedding lookup: x[t][c] = widen(table[tok][c]). One block per token.

#define EMBED_KERNEL(NAME, T, CONV)                                                              \
    extern "C" __global__ void NAME(const T* __restrict__ table, const u32* __restrict__ tokens, \
                                    int vocab, int hidden, float* __restrict__ x) { PDL_WAIT();              \
        const int t = blockIdx.x;                                                                \
        u32 tok = tokens[t];                                                                     \
        if (tok >= (u32)vocab) tok = 0; /* the host validates; never read out of bounds */     \
        const T* row = table + (u64)tok * (u64)hidden;                                           \
        float* out = x + (u64)t * (u64)hidden;                                                   \
        for (int c = threadIdx.x; c < hidden; c += blockDim.x) out[c] = CONV(row[c]);            \
    }

__device__ __forceinline__ float f32_id(float v) { return v; }

EMBED_KERNEL(embed_f32, float, f32_id)
EMBED_KERNEL(embed_f16, u16, f16_to_f32)
EMBED_KERNEL(embed_bf16, u16, bf16_to_f32)

// ---------------------------------------------------------------------------------------------
// RMSNorm fused with int8 activation quantization. One block per token.
//
// value(c) = x[t][c], or (relu2 != 0) relu(x[t][c])^2 * x[t][d + c] (gate | up rows).
// y = w[c] * (value * r), r = 1 / sqrt(float(sum(value^2 in f64) / d) + eps)   (as rms_norm)
// s = 127 / max(max|y|, 1e-5); q = quant_i8(y * s)                           (as store_row)
// Writes the whole padded row q[t][0..qs) (zeros past d), scale[t] = s, qsum[t] = sum of q.

__device__ __forceinline__ float norm_in(const float* xr, int c, int d, int relu2) {
    if (relu2) {
        const float g = xr[c];
        const float u = xr[d + c];
        const float r = fmaxf(g, 0.0f);
        return (r * r) * u;
    }
    return xr[c];
}

// The block runs NORM_THREADS threads; each keeps its first NORM_CACHE values in registers
// (one read of the row for d <= 8192), values past that are re-read (same arithmetic).
#define NORM_THREADS 512
#define NORM_CACHE 16

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rmsnorm_quant(
    const float* __restrict__ x, int xs, const float* __restrict__ w, int d, float eps, int relu2,
    i8* __restrict__ q, int qs, float* __restrict__ qscale, int* __restrict__ qsum) { PDL_WAIT();
    // one barrier per reduction: warp partials land in their own array, every thread then adds
    // them in warp order (a decode step runs 120 of these single-block kernels: barriers count)
    __shared__ double s_ss[NORM_THREADS / 32];
    __shared__ float s_mx[NORM_THREADS / 32];
    __shared__ int s_sum[NORM_THREADS / 32];
    const int t = blockIdx.x;
    const int bd = blockDim.x, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = bd >> 5;
    const float* xr = x + (u64)t * (u64)xs;
    float v[NORM_CACHE];
    double ss = 0.0;
#pragma unroll
    for (int k = 0; k < NORM_CACHE; k++) {
        const int c = threadIdx.x + k * bd;
        v[k] = c < d ? norm_in(xr, c, d, relu2) : 0.0f;
        ss += (double)v[k] * (double)v[k];
    }
    for (int c = threadIdx.x + NORM_CACHE * bd; c < d; c += bd) {
        const double e = (double)norm_in(xr, c, d, relu2);
        ss += e * e;
    }
    ss = warp_sum_d(ss);
    if (lane == 0) s_ss[wid] = ss;
    __syncthreads();
    ss = 0.0;
    for (int i = 0; i < nw; i++) ss += s_ss[i];
    const float var = (float)(ss / (double)d);
    const float r = 1.0f / sqrtf(var + eps);
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < NORM_CACHE; k++) {
        const int c = threadIdx.x + k * bd;
        if (c < d) {
            v[k] = w[c] * (v[k] * r);  // y, kept for the quantization
            amax = fmaxf(amax, fabsf(v[k]));
        }
    }
    for (int c = threadIdx.x + NORM_CACHE * bd; c < d; c += bd) {
        const float y = w[c] * (norm_in(xr, c, d, relu2) * r);
        amax = fmaxf(amax, fabsf(y));
    }
    amax = warp_max_f(amax);
    if (lane == 0) s_mx[wid] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int i = 0; i < nw; i++) amax = fmaxf(amax, s_mx[i]);
    const float s = 127.0f / fmaxf(amax, 1e-5f);
    i8* qr = q + (u64)t * (u64)qs;
    int sum = 0;
#pragma unroll
    for (int k = 0; k < NORM_CACHE; k++) {
        const int c = threadIdx.x + k * bd;
        if (c < qs) {
            const int qv = c < d ? quant_i8(v[k] * s) : 0;
            qr[c] = (i8)qv;
            sum += qv;
        }
    }
    for (int c = threadIdx.x + NORM_CACHE * bd; c < qs; c += bd) {
        int qv = 0;
        if (c < d) {
            const float y = w[c] * (norm_in(xr, c, d, relu2) * r);
            qv = quant_i8(y * s);
        }
        qr[c] = (i8)qv;
        sum += qv;
    }
    sum = warp_sum_i(sum);
    if (lane == 0) s_sum[wid] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int i = 0; i < nw; i++) total += s_sum[i];
        qscale[t] = s;
        qsum[t] = total;
    }
}

// Plain RMSNorm to f32 (the final norm before the LM head): out[i] = norm(x[first + i]).
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, int xs, int first,
                                       const float* __restrict__ w, int d, float eps,
                                       float* __restrict__ out) { PDL_WAIT();
    const int i = blockIdx.x;
    const float* xr = x + (u64)(first + i) * (u64)xs;
    double ss = 0.0;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        const double v = (double)xr[c];
        ss += v * v;
    }
    ss = block_sum_d(ss);
    const float var = (float)(ss / (double)d);
    const float r = 1.0f / sqrtf(var + eps);
    float* o = out + (u64)i * (u64)d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = w[c] * (xr[c] * r);
}

// ---------------------------------------------------------------------------------------------
// int8 x ternary matmul on the tensor cores (mma.sync m16n8k32 s8), exact in i32.
//
// W: packed tiles (see pack.rs): tile (rb, kb) is 32 uint4, one per lane.
// X: int8 activations [ntok][xs] (xs >= ktiles * 128 and a multiple of 16, zero padded; rows
// read with 16-byte loads); xscale/xsum per token.
// out[n * os + r] = (float)(sum_k code[r][k] * x[n][k]) / xscale[n] * rscale[r]
// (accumulate != 0: out += that, the residual add of o_proj / down_proj).
//
// Block: 256 threads = 8 warps, one row block of 16 rows (blockIdx.x) and 8*NT tokens starting
// at 8*NT*blockIdx.y. The warps split the k tiles (warp w takes kb = w, w+8, ...), so the block
// streams consecutive tiles; partial sums meet in shared memory as integers (exact in any order).

__device__ __forceinline__ void mma_s8(int (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, int b0, int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define TMM_WARPS 8
#define TMM_UNROLL 4

template <int NT>
__device__ __forceinline__ void ternary_mm_body(const uint4* __restrict__ W, int ktiles, int m,
                                                const i8* __restrict__ X, int xs, int ntok,
                                                const float* __restrict__ xscale,
                                                const int* __restrict__ xsum,
                                                const float* __restrict__ rscale,
                                                float* __restrict__ out, int os, int accumulate) {
    __shared__ int red[NT * 8][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int rb = blockIdx.x;
    const int tok0 = blockIdx.y * NT * 8;

    for (int i = threadIdx.x; i < NT * 8 * 16; i += blockDim.x) (&red[0][0])[i] = 0;

    int acc[NT][4];
    const uint4* xr[NT];
    bool ok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
        const int n = tok0 + nt * 8 + g;
        ok[nt] = n < ntok;
        // the lane's 32 activation bytes of tile kb: x[n][128 kb + 32 tq ..] (pack.rs)
        xr[nt] = (const uint4*)(X + (u64)(ok[nt] ? n : 0) * (u64)xs) + 2 * tq;
    }
    const uint4* wt = W + (u64)rb * (u64)ktiles * 32u + lane;

    for (int kb0 = warp; kb0 < ktiles; kb0 += TMM_WARPS * TMM_UNROLL) {
        uint4 wv[TMM_UNROLL];
#pragma unroll
        for (int u = 0; u < TMM_UNROLL; u++) {
            const int kb = kb0 + TMM_WARPS * u;
            wv[u] = kb < ktiles ? __ldg(wt + (u64)kb * 32u) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < TMM_UNROLL; u++) {
            const int kb = kb0 + TMM_WARPS * u;
            if (kb < ktiles) {
                const u32 ws[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    uint4 xa = make_uint4(0u, 0u, 0u, 0u), xb = xa;
                    if (ok[nt]) {
                        xa = __ldg(xr[nt] + (u64)kb * 8u);
                        xb = __ldg(xr[nt] + (u64)kb * 8u + 1u);
                    }
                    const int xw[8] = {(int)xa.x, (int)xa.y, (int)xa.z, (int)xa.w,
                                       (int)xb.x, (int)xb.y, (int)xb.z, (int)xb.w};
#pragma unroll
                    for (int s = 0; s < 4; s++) {
                        const u32 wd = ws[s];
                        mma_s8(acc[nt], wd & 0x03030303u, (wd >> 2) & 0x03030303u,
                               (wd >> 4) & 0x03030303u, (wd >> 6) & 0x03030303u, xw[2 * s],
                               xw[2 * s + 1]);
                    }
                }
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        // c0 = C[g][2tq], c1 = C[g][2tq+1], c2 = C[g+8][2tq], c3 = C[g+8][2tq+1]
        atomicAdd(&red[nt * 8 + 2 * tq][g], acc[nt][0]);
        atomicAdd(&red[nt * 8 + 2 * tq + 1][g], acc[nt][1]);
        atomicAdd(&red[nt * 8 + 2 * tq][g + 8], acc[nt][2]);
        atomicAdd(&red[nt * 8 + 2 * tq + 1][g + 8], acc[nt][3]);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < NT * 8 * 16; i += blockDim.x) {
        const int tt = i >> 4, row = i & 15;
        const int n = tok0 + tt, r = rb * 16 + row;
        if (n < ntok && r < m) {
            const int dot = red[tt][row] - xsum[n];
            const float y = (float)dot / xscale[n] * rscale[r];
            float* o = out + (u64)n * (u64)os + r;
            if (accumulate) {
                *o = *o + y;
            } else {
                *o = y;
            }
        }
    }
}

#define TMM_KERNEL(NT)                                                                           \
    extern "C" __global__ void __launch_bounds__(256) ternary_mm_nt##NT(                         \
        const uint4* __restrict__ W, int ktiles, int m, const i8* __restrict__ X, int xs,        \
        int ntok, const float* __restrict__ xscale, const int* __restrict__ xsum,               \
        const float* __restrict__ rscale, float* __restrict__ out, int os, int accumulate) { PDL_WAIT();     \
        ternary_mm_body<NT>(W, ktiles, m, X, xs, ntok, xscale, xsum, rscale, out, os,            \
                            accumulate);                                                        \
    }

TMM_KERNEL(1)
TMM_KERNEL(2)
TMM_KERNEL(4)

// The same product for many tokens (prefill, more than 32): block 256 threads = 8 warps, warp w
// owns row block 8 blockIdx.x + w (16 rows) and walks every k tile itself; the block's 64 tokens
// (from 64 blockIdx.y) are staged in shared memory TMW_KT k tiles at a time and shared by the 8
// warps (the split-k kernel above re-reads them from L2 for every row block). Rows of the stage
// are 16 bytes longer than the data, which keeps the lanes' 16-byte reads conflict-free.
#define TMW_KT 4
#define TMW_ROW (TMW_KT * 128 + 16)

template <int NTW>  // n-tiles of 8 tokens per block: 8 (64 tokens) or 4 (32, for small grids)
__device__ __forceinline__ void ternary_mm_wide_body(
    const uint4* __restrict__ W, int ktiles, int m, int rblocks, const i8* __restrict__ X, int xs,
    int ntok, const float* __restrict__ xscale, const int* __restrict__ xsum,
    const float* __restrict__ rscale, float* __restrict__ out, int os, int accumulate) {
    constexpr int TMW_TOK = NTW * 8;
    __shared__ __align__(16) i8 xsm[TMW_TOK * TMW_ROW];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int rb = blockIdx.x * 8 + warp;
    const bool rok = rb < rblocks;  // warp-uniform
    const int tok0 = blockIdx.y * TMW_TOK;
    int acc[NTW][4];
#pragma unroll
    for (int nt = 0; nt < NTW; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
    const uint4* wt = W + (u64)min(rb, rblocks - 1) * (u64)ktiles * 32u + lane;

    for (int kb0 = 0; kb0 < ktiles; kb0 += TMW_KT) {
        const int nkt = min(TMW_KT, ktiles - kb0);
        uint4 wv[TMW_KT];
#pragma unroll
        for (int u = 0; u < TMW_KT; u++) {
            wv[u] = u < nkt ? __ldg(wt + (u64)(kb0 + u) * 32u) : make_uint4(0u, 0u, 0u, 0u);
        }
        __syncthreads();  // the previous stage is consumed
        const int vpr = nkt * 8;  // 16-byte vectors per token row of the stage
        for (int base = 0; base < TMW_TOK * vpr; base += 8 * 256) {
            uint4 r[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * 256 + (int)threadIdx.x;
                const int row = i / vpr, c = i - row * vpr;
                r[u] = make_uint4(0u, 0u, 0u, 0u);
                if (i < TMW_TOK * vpr && tok0 + row < ntok) {
                    r[u] = __ldg((const uint4*)(X + (u64)(tok0 + row) * (u64)xs + (u64)kb0 * 128u) + c);
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * 256 + (int)threadIdx.x;
                const int row = i / vpr, c = i - row * vpr;
                if (i < TMW_TOK * vpr) *(uint4*)(xsm + row * TMW_ROW + 16 * c) = r[u];
            }
        }
        __syncthreads();
        if (rok) {
#pragma unroll
            for (int u = 0; u < TMW_KT; u++) {
                if (u < nkt) {
                    const u32 ws[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
                    for (int nt = 0; nt < NTW; nt++) {
                        const uint4* xp = (const uint4*)(xsm + (nt * 8 + g) * TMW_ROW + u * 128 + 32 * tq);
                        const uint4 xa = xp[0], xb = xp[1];
                        const int xw[8] = {(int)xa.x, (int)xa.y, (int)xa.z, (int)xa.w,
                                           (int)xb.x, (int)xb.y, (int)xb.z, (int)xb.w};
#pragma unroll
                        for (int s = 0; s < 4; s++) {
                            const u32 wd = ws[s];
                            mma_s8(acc[nt], wd & 0x03030303u, (wd >> 2) & 0x03030303u,
                                   (wd >> 4) & 0x03030303u, (wd >> 6) & 0x03030303u, xw[2 * s],
                                   xw[2 * s + 1]);
                        }
                    }
                }
            }
        }
    }
    if (!rok) return;
    // c0 = C[g][2tq], c1 = C[g][2tq+1], c2 = C[g+8][2tq], c3 = C[g+8][2tq+1] (row, token)
#pragma unroll
    for (int nt = 0; nt < NTW; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int r = rb * 16 + g + 8 * (e >> 1);
            const int n = tok0 + nt * 8 + 2 * tq + (e & 1);
            if (n < ntok && r < m) {
                const int dot = acc[nt][e] - xsum[n];
                const float y = (float)dot / xscale[n] * rscale[r];
                float* o = out + (u64)n * (u64)os + r;
                if (accumulate) {
                    *o = *o + y;
                } else {
                    *o = y;
                }
            }
        }
    }
}

#define TMW_KERNEL(NAME, NTW)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                        \
        const uint4* __restrict__ W, int ktiles, int m, int rblocks, const i8* __restrict__ X,     \
        int xs, int ntok, const float* __restrict__ xscale, const int* __restrict__ xsum,         \
        const float* __restrict__ rscale, float* __restrict__ out, int os, int accumulate) { PDL_WAIT();       \
        ternary_mm_wide_body<NTW>(W, ktiles, m, rblocks, X, xs, ntok, xscale, xsum, rscale, out,   \
                                  os, accumulate);                                                \
    }

TMW_KERNEL(ternary_mm_wide, 8)
TMW_KERNEL(ternary_mm_wide32, 4)

// ---------------------------------------------------------------------------------------------
// RoPE (rotate-half) on q and k in place, then k and v written to the paged KV cache.
// One block per token. Tables cos/sin are [max_pos][half], exactly the CPU's.
// Cache layout (per layer): [n_blocks][block_size][kv_dim]; layer_off = layer * n_blocks *
// block_size * kv_dim elements.

extern "C" __global__ void rope_kv(float* __restrict__ qkv, int qkv_stride,
                                   const int* __restrict__ pos, const int* __restrict__ slot,
                                   const int* __restrict__ block_table, int max_blocks,
                                   const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                   int half, int n_heads, int n_kv_heads,
                                   kv_t* __restrict__ k_cache, kv_t* __restrict__ v_cache,
                                   u64 layer_off, int block_size, int kv_dim) { PDL_WAIT();
    const int t = blockIdx.x;
    const int p = pos[t];
    float* row = qkv + (u64)t * (u64)qkv_stride;
    const float* cs = cos_t + (u64)p * (u64)half;
    const float* sn = sin_t + (u64)p * (u64)half;
    const int hd = 2 * half;
    const int pairs = (n_heads + n_kv_heads) * half;  // q heads then k heads, contiguous
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int head = i / half, j = i - head * half;
        float* h = row + head * hd;
        const float x1 = h[j], x2 = h[j + half];
        h[j] = x1 * cs[j] - x2 * sn[j];
        h[j + half] = x2 * cs[j] + x1 * sn[j];
    }
    __syncthreads();
    const int q_dim = n_heads * hd;
    const int b = block_table[slot[t] * max_blocks + p / block_size];
    const u64 off = layer_off + ((u64)b * (u64)block_size + (u64)(p % block_size)) * (u64)kv_dim;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        k_cache[off + i] = kv_from_f32(row[q_dim + i]);
        v_cache[off + i] = kv_from_f32(row[q_dim + kv_dim + i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Attention. Scores q.k * scale, softmax in f32 (online, per tile of keys), GQA: q head h
// reads kv head h / G. The dot products use explicit fused multiply-adds (__fmaf_rn): the module
// is compiled with --fmad=false so that the norms match the CPU bit for bit, but attention is
// compared within a tolerance, and a separate multiply and add would halve its throughput. head_dim is a multiple of 32, at most 256; G at most 16.

#define ATT_TILE 32
#define ATT_MAXD 8       // head_dim / 32
#define ATT_QH 4         // q heads per warp (decode: G <= 16 with 4 warps)
#define ATT_PQ 4         // queries per warp (prefill: 16 tokens per block with 4 warps)

// Loads keys [kt, kt + nk) of one kv head into sk ([32][hd+1], padded: lane j reads row j) and
// sv ([32][hd]). 16-byte loads (4 f32 or 8 f16 values), coalesced along the head's row; each
// thread issues all its loads of a round before its first store, so a tile costs about one
// memory latency (a load-store-load chain per element cost one latency per element).
#define KV_VEC (16 / (int)sizeof(kv_t))
#define ATT_LD 8  // 16-byte loads of K (and of V) per thread per round

__device__ __forceinline__ void kv_widen16(const uint4 raw, float* out) {
#if KV_F16
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = f16_to_f32((u16)(w[i] & 0xffffu));
        out[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
    }
#else
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
#endif
}

__device__ __forceinline__ void att_load_tile(float* sk, float* sv, const kv_t* k_cache,
                                              const kv_t* v_cache, u64 layer_off,
                                              const int* bt_row, int block_size, int kv_dim,
                                              int kh, int hd, int kt, int nk) {
    const int vpr = hd / KV_VEC;  // vectors per key row (hd % 32 == 0)
    const int total = nk * vpr;
    for (int base = 0; base < total; base += ATT_LD * (int)blockDim.x) {
        uint4 rk[ATT_LD], rv[ATT_LD];
#pragma unroll
        for (int r = 0; r < ATT_LD; r++) {
            const int i = base + r * (int)blockDim.x + (int)threadIdx.x;
            if (i < total) {
                const int j = i / vpr, c = i - j * vpr;
                const int kp = kt + j;
                const int b = bt_row[kp / block_size];
                const u64 off = layer_off +
                                ((u64)b * (u64)block_size + (u64)(kp % block_size)) * (u64)kv_dim +
                                (u64)(kh * hd + c * KV_VEC);
                rk[r] = __ldg((const uint4*)(k_cache + off));
                rv[r] = __ldg((const uint4*)(v_cache + off));
            }
        }
#pragma unroll
        for (int r = 0; r < ATT_LD; r++) {
            const int i = base + r * (int)blockDim.x + (int)threadIdx.x;
            if (i < total) {
                const int j = i / vpr, c = i - j * vpr;
                float kf[KV_VEC], vf[KV_VEC];
                kv_widen16(rk[r], kf);
                kv_widen16(rv[r], vf);
                float* kd = sk + j * (hd + 1) + c * KV_VEC;
                float* vd = sv + j * hd + c * KV_VEC;
#pragma unroll
                for (int e = 0; e < KV_VEC; e++) {
                    kd[e] = kf[e];
                    vd[e] = vf[e];
                }
            }
        }
    }
}

// One online-softmax update of one query (held in shared memory, `sq`) with a tile of keys:
// lane j scores key j (valid when `ok`). m, l, o[] are the running max, sum and output.
__device__ __forceinline__ void att_update(const float* sq, const float* sk, const float* sv,
                                           int hd, int nk, bool ok, float scale, float& m,
                                           float& l, float (&o)[ATT_MAXD]) {
    const int lane = threadIdx.x & 31;
    float sc = NEG_INF;
    if (ok) {
        const float* kr = sk + lane * (hd + 1);
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;  // 4 chains (hd % 32 == 0)
        for (int d = 0; d < hd; d += 4) {
            a0 = __fmaf_rn(sq[d], kr[d], a0);
            a1 = __fmaf_rn(sq[d + 1], kr[d + 1], a1);
            a2 = __fmaf_rn(sq[d + 2], kr[d + 2], a2);
            a3 = __fmaf_rn(sq[d + 3], kr[d + 3], a3);
        }
        sc = ((a0 + a1) + (a2 + a3)) * scale;
    }
    const float m_new = fmaxf(m, warp_max_f(sc));  // finite: the caller ensures a valid key
    const float alpha = expf(m - m_new);            // 0 on the first tile (m = -inf)
    const float e = ok ? expf(sc - m_new) : 0.0f;
    l = l * alpha + warp_sum_f(e);
#pragma unroll
    for (int dd = 0; dd < ATT_MAXD; dd++) o[dd] *= alpha;
    for (int j = 0; j < nk; j++) {
        const float ej = __shfl_sync(FULL_MASK, e, j);
        const float* vr = sv + j * hd;
#pragma unroll
        for (int dd = 0; dd < ATT_MAXD; dd++) {
            if (dd * 32 < hd) o[dd] = __fmaf_rn(ej, vr[dd * 32 + lane], o[dd]);
        }
    }
    m = m_new;
}

// Decode (flash-decode): grid (nsplit, n_kv_heads, n_tok), block 128. Token t attends to its
// keys [sp * split, min((sp+1) * split, pos[t] + 1)) (split: a multiple of ATT_TILE); warp w serves q heads w, w+4, ...
// of the kv group (K/V tiles are loaded once for the G heads). A split block writes, per
// (t, h, sp), part_ml = (max, sum) and part_o = the unnormalized output; blocks of splits past
// the token's keys exit at once. The last of a (token, kv head)'s used split blocks to finish
// (counted in `arrivals`, which it resets to 0 for the next launch) merges them:
// out[t][h*hd + d] = sum_s o_s[d] e^(m_s - M) / sum_s l_s e^(m_s - M) (with one split: o / l, as
// attn_prefill). Dynamic shared: (G*hd + 32*(hd+1) + 32*hd) floats.
extern "C" __global__ void __launch_bounds__(128) attn_decode(
    const float* __restrict__ qkv, int qkv_stride, const int* __restrict__ pos,
    const int* __restrict__ slot, const int* __restrict__ block_table, int max_blocks,
    const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache, u64 layer_off,
    int block_size, int kv_dim, int n_heads, int G, int hd, float scale, int split, int nsplit,
    float* __restrict__ part_ml, float* __restrict__ part_o, int* __restrict__ arrivals,
    float* __restrict__ out, int out_stride) { PDL_WAIT();
    extern __shared__ float att_sm[];
    const int sp = blockIdx.x, kh = blockIdx.y, t = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_keys = pos[t] + 1;
    const int k0 = sp * split;
    const int k1 = min(k0 + split, n_keys);
    const int nused = min(nsplit, (n_keys + split - 1) / split);
    if (sp >= nused) return;  // no keys here (uniform over the block)
    float* sq = att_sm;
    float* sk = sq + G * hd;
    float* sv = sk + ATT_TILE * (hd + 1);

    float m[ATT_QH], l[ATT_QH], o[ATT_QH][ATT_MAXD];
#pragma unroll
    for (int gi = 0; gi < ATT_QH; gi++) {
        m[gi] = NEG_INF;
        l[gi] = 0.0f;
#pragma unroll
        for (int dd = 0; dd < ATT_MAXD; dd++) o[gi][dd] = 0.0f;
    }
    if (k0 < k1) {
        const float* qrow = qkv + (u64)t * (u64)qkv_stride + (u64)(kh * G) * (u64)hd;
        for (int i = threadIdx.x; i < G * hd; i += blockDim.x) sq[i] = qrow[i];
        const int* bt_row = block_table + slot[t] * max_blocks;
        for (int kt = k0; kt < k1; kt += ATT_TILE) {
            const int nk = min(ATT_TILE, k1 - kt);
            __syncthreads();  // the previous tile is consumed (and sq is written)
            att_load_tile(sk, sv, k_cache, v_cache, layer_off, bt_row, block_size, kv_dim, kh, hd,
                          kt, nk);
            __syncthreads();
#pragma unroll
            for (int gi = 0; gi < ATT_QH; gi++) {
                const int g = warp + 4 * gi;
                if (g < G) {
                    att_update(sq + g * hd, sk, sv, hd, nk, lane < nk, scale, m[gi], l[gi], o[gi]);
                }
            }
        }
    }
#pragma unroll
    for (int gi = 0; gi < ATT_QH; gi++) {
        const int g = warp + 4 * gi;
        if (g < G) {
            const u64 idx = ((u64)t * (u64)n_heads + (u64)(kh * G + g)) * (u64)nsplit + (u64)sp;
            if (lane == 0) {
                part_ml[2 * idx] = m[gi];
                part_ml[2 * idx + 1] = l[gi];
            }
#pragma unroll
            for (int dd = 0; dd < ATT_MAXD; dd++) {
                if (dd * 32 < hd) part_o[idx * (u64)hd + dd * 32 + lane] = o[gi][dd];
            }
        }
    }
    // the last block of this (token, kv head) to arrive merges the splits
    __shared__ int s_last;
    __threadfence();  // this block's partials are visible device-wide before it is counted
    __syncthreads();
    int* arr = arrivals + (u64)t * (u64)gridDim.y + kh;
    if (threadIdx.x == 0) s_last = atomicAdd(arr, 1) == nused - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    // warp w merges q heads w, w+4, ...: split weights e^(m_s - M) in lanes, outputs in dims
    for (int g = warp; g < G; g += 4) {
        const int h = kh * G + g;
        const u64 base = ((u64)t * (u64)n_heads + (u64)h) * (u64)nsplit;
        float mx = NEG_INF;
        for (int s = lane; s < nused; s += 32) mx = fmaxf(mx, __ldcg(part_ml + 2 * (base + s)));
        mx = warp_max_f(mx);
        float L = 0.0f, acc[ATT_MAXD];
#pragma unroll
        for (int dd = 0; dd < ATT_MAXD; dd++) acc[dd] = 0.0f;
        for (int s0 = 0; s0 < nused; s0 += 32) {
            const int s = s0 + lane;
            float w = 0.0f;
            if (s < nused) {
                const float ms = __ldcg(part_ml + 2 * (base + s));
                if (ms != NEG_INF) {
                    w = expf(ms - mx);
                    L += __ldcg(part_ml + 2 * (base + s) + 1) * w;
                }
            }
            const int cnt = min(32, nused - s0);
#pragma unroll 4
            for (int j = 0; j < cnt; j++) {
                const float wj = __shfl_sync(FULL_MASK, w, j);
                const float* po = part_o + (base + s0 + j) * (u64)hd + lane;
#pragma unroll
                for (int dd = 0; dd < ATT_MAXD; dd++) {
                    if (dd * 32 < hd) acc[dd] = __fmaf_rn(wj, __ldcg(po + dd * 32), acc[dd]);
                }
            }
        }
        L = warp_sum_f(L);
        float* orow = out + (u64)t * (u64)out_stride + (u64)h * (u64)hd + lane;
#pragma unroll
        for (int dd = 0; dd < ATT_MAXD; dd++) {
            if (dd * 32 < hd) orow[dd * 32] = acc[dd] / L;
        }
    }
    if (threadIdx.x == 0) *arr = 0;
}

// Prefill: the step's tokens belong to one sequence (slot[0]) and attend causally to their
// keys 0..pos[t]. grid (ceil(ntok / 32), n_heads), block 128. A flash-attention tile loop in
// f32 on the CUDA cores, register-tiled like an SGEMM: thread (ty, tx) = (tid / 16, tid % 16)
// scores queries 4ty..4ty+3 against keys 4tx..4tx+3 of each 64-key tile (two 16-byte shared
// loads per 16 FMAs), keeps their online-softmax state (max and sum shared by the 16 threads
// of a query row, reduced with shuffles inside the half warp), and accumulates output dims
// 4(tx + 16j) + e (j < hd/64, e < 4) from the tile's probabilities and V rows.
// Shared (dynamic): Qt [hd][32] and Kt [hd][64] transposed, their 4-column groups XOR-swizzled
// by (d / 4) (mod the groups of a row) so that the transposing stores are conflict-free;
// Pt [64][36] (the tile's probabilities, over Kt once the scores are made); V [64][hd].
// 32 queries per block (not 64): the causal work per block is uneven (the last query tile
// attends to every key), and smaller blocks halve the longest one (measured on an H200).
#define APF_BQ 32
#define APF_BK 64
#define APF_PT (APF_BQ + 4)
#define APF_THREADS 128

// column of element (d, j) in a swizzled transposed tile whose rows hold (mask + 1) groups of 4
__device__ __forceinline__ int apf_col(int d, int j, int mask) {
    return 4 * ((j >> 2) ^ ((d >> 2) & mask)) + (j & 3);
}

// four consecutive values of a head row from the KV cache (f32 or f16), widened
__device__ __forceinline__ float4 kv_load4(const kv_t* p) {
#if KV_F16
    const uint2 r = __ldg((const uint2*)p);
    return make_float4(f16_to_f32((u16)(r.x & 0xffffu)), f16_to_f32((u16)(r.x >> 16)),
                       f16_to_f32((u16)(r.y & 0xffffu)), f16_to_f32((u16)(r.y >> 16)));
#else
    return __ldg((const float4*)p);
#endif
}

template <int NJ>
__device__ __forceinline__ void attn_prefill_body(
    const float* __restrict__ qkv, int qkv_stride, int ntok, const int* __restrict__ pos,
    const int* __restrict__ slot, const int* __restrict__ block_table, int max_blocks,
    const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache, u64 layer_off,
    int block_size, int kv_dim, int n_heads, int G, int hd, float scale, float* __restrict__ out,
    int out_stride) {
    extern __shared__ __align__(16) float apf_sm[];
    __shared__ int s_pos[APF_BQ];
    __shared__ int s_pmax;
    float* qts = apf_sm;                                // [hd][32]
    float* kts = qts + hd * APF_BQ;                     // [hd][64], then Pt [64][36]
    float* pts = kts;                                   // (K^T is dead once the scores are made)
    float* vs = kts + max(hd * APF_BK, APF_BK * APF_PT);  // [64][hd]
    // the last query tiles attend to the most keys: they start first
    const int tb = (gridDim.x - 1 - blockIdx.x) * APF_BQ, h = blockIdx.y, kh = h / G;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int c4 = hd / 4;  // 4-value groups per head row (a multiple of 8)

    if (tid < APF_BQ) s_pos[tid] = tb + tid < ntok ? pos[tb + tid] : -1;
    // Q^T: lanes cover 4 queries x 8 groups (global reads of 128 contiguous bytes per query)
    constexpr int QM = APF_BQ / 4 - 1, KM = APF_BK / 4 - 1;  // swizzle masks
    for (int i = tid; i < APF_BQ * c4; i += APF_THREADS) {
        const int jl = i & 3, cl = (i >> 2) & 7, rest = i >> 5;
        const int c = (rest % (c4 / 8)) * 8 + cl, q = (rest / (c4 / 8)) * 4 + jl;
        const float4 v = tb + q < ntok
                             ? __ldg((const float4*)(qkv + (u64)(tb + q) * (u64)qkv_stride + (u64)(h * hd + 4 * c)))
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        qts[(4 * c + 0) * APF_BQ + apf_col(4 * c, q, QM)] = v.x;
        qts[(4 * c + 1) * APF_BQ + apf_col(4 * c, q, QM)] = v.y;
        qts[(4 * c + 2) * APF_BQ + apf_col(4 * c, q, QM)] = v.z;
        qts[(4 * c + 3) * APF_BQ + apf_col(4 * c, q, QM)] = v.w;
    }
    __syncthreads();
    if (tid < 32) {
        const int pm = warp_max_i(s_pos[tid]);  // APF_BQ == 32
        if (tid == 0) s_pmax = pm;
    }
    int pq[4];
#pragma unroll
    for (int i = 0; i < 4; i++) pq[i] = s_pos[4 * ty + i];
    __syncthreads();
    const int pmax = s_pmax;
    const int* bt_row = block_table + slot[0] * max_blocks;

    float m[4], l[4], o[4][NJ][4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++) o[i][j][0] = o[i][j][1] = o[i][j][2] = o[i][j][3] = 0.0f;
    }

    for (int kt = 0; kt <= pmax; kt += APF_BK) {
        const int nk = min(APF_BK, pmax + 1 - kt);
        __syncthreads();  // the previous tile is consumed
        // K^T (swizzled): lanes cover 4 keys x 8 groups; all loads of a round before any store
        for (int base = 0; base < APF_BK * c4; base += 8 * APF_THREADS) {
            float4 r[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * APF_THREADS + tid;
                const int jl = i & 3, cl = (i >> 2) & 7, rest = i >> 5;
                const int c = (rest % (c4 / 8)) * 8 + cl, j = (rest / (c4 / 8)) * 4 + jl;
                r[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (i < APF_BK * c4 && j < nk) {
                    const int kp = kt + j;
                    const int b = bt_row[kp / block_size];
                    r[u] = kv_load4(k_cache + layer_off +
                                    ((u64)b * (u64)block_size + (u64)(kp % block_size)) * (u64)kv_dim +
                                    (u64)(kh * hd + 4 * c));
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * APF_THREADS + tid;
                if (i < APF_BK * c4) {
                    const int jl = i & 3, cl = (i >> 2) & 7, rest = i >> 5;
                    const int c = (rest % (c4 / 8)) * 8 + cl, j = (rest / (c4 / 8)) * 4 + jl;
                    kts[(4 * c + 0) * APF_BK + apf_col(4 * c, j, KM)] = r[u].x;
                    kts[(4 * c + 1) * APF_BK + apf_col(4 * c, j, KM)] = r[u].y;
                    kts[(4 * c + 2) * APF_BK + apf_col(4 * c, j, KM)] = r[u].z;
                    kts[(4 * c + 3) * APF_BK + apf_col(4 * c, j, KM)] = r[u].w;
                }
            }
        }
        // V, row-major: lanes along the row
        for (int base = 0; base < APF_BK * c4; base += 8 * APF_THREADS) {
            float4 r[8];
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * APF_THREADS + tid;
                const int j = i / c4, c = i - j * c4;
                r[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (i < APF_BK * c4 && j < nk) {
                    const int kp = kt + j;
                    const int b = bt_row[kp / block_size];
                    r[u] = kv_load4(v_cache + layer_off +
                                    ((u64)b * (u64)block_size + (u64)(kp % block_size)) * (u64)kv_dim +
                                    (u64)(kh * hd + 4 * c));
                }
            }
#pragma unroll
            for (int u = 0; u < 8; u++) {
                const int i = base + u * APF_THREADS + tid;
                if (i < APF_BK * c4) *(float4*)(vs + 4 * i) = r[u];
            }
        }
        __syncthreads();

        float sc[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++) sc[i][0] = sc[i][1] = sc[i][2] = sc[i][3] = 0.0f;
        for (int d = 0; d < hd; d++) {
            const int sw = d >> 2;
            const float4 q4 = *(const float4*)(qts + d * APF_BQ + 4 * (ty ^ (sw & QM)));
            const float4 k4 = *(const float4*)(kts + d * APF_BK + 4 * (tx ^ (sw & KM)));
            const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
            const float kv[4] = {k4.x, k4.y, k4.z, k4.w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
#pragma unroll
                for (int j = 0; j < 4; j++) sc[i][j] = __fmaf_rn(qv[i], kv[j], sc[i][j]);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mt = NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int key = kt + 4 * tx + j;
                sc[i][j] = key <= pq[i] ? sc[i][j] * scale : NEG_INF;
                mt = fmaxf(mt, sc[i][j]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(FULL_MASK, mt, off));
            const float m_new = fmaxf(m[i], mt);
            const float base = m_new == NEG_INF ? 0.0f : m_new;  // a row with no key yet
            const float alpha = expf(m[i] - base);
            float rs = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                sc[i][j] = sc[i][j] == NEG_INF ? 0.0f : expf(sc[i][j] - base);
                rs += sc[i][j];
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1) rs += __shfl_xor_sync(FULL_MASK, rs, off);
            l[i] = l[i] * alpha + rs;
            m[i] = m_new;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                o[i][j][0] *= alpha;
                o[i][j][1] *= alpha;
                o[i][j][2] *= alpha;
                o[i][j][3] *= alpha;
            }
        }
        __syncthreads();  // every score is made: P may overwrite K^T
#pragma unroll
        for (int j = 0; j < 4; j++) {
            *(float4*)(pts + (4 * tx + j) * APF_PT + 4 * ty) = make_float4(sc[0][j], sc[1][j], sc[2][j], sc[3][j]);
        }
        __syncthreads();
        for (int k = 0; k < nk; k++) {
            const float4 p4 = *(const float4*)(pts + k * APF_PT + 4 * ty);
            const float pv[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                if (4 * (tx + 16 * j) < hd) {
                    const float4 v4 = *(const float4*)(vs + k * hd + 4 * (tx + 16 * j));
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        o[i][j][0] = __fmaf_rn(pv[i], v4.x, o[i][j][0]);
                        o[i][j][1] = __fmaf_rn(pv[i], v4.y, o[i][j][1]);
                        o[i][j][2] = __fmaf_rn(pv[i], v4.z, o[i][j][2]);
                        o[i][j][3] = __fmaf_rn(pv[i], v4.w, o[i][j][3]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int t = tb + 4 * ty + i;
        if (t < ntok) {
            float* orow = out + (u64)t * (u64)out_stride + (u64)(h * hd);
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                const int d = 4 * (tx + 16 * j);
                if (d < hd) {
                    *(float4*)(orow + d) =
                        make_float4(o[i][j][0] / l[i], o[i][j][1] / l[i], o[i][j][2] / l[i], o[i][j][3] / l[i]);
                }
            }
        }
    }
}

#define APF_KERNEL(NJ, MINB)                                                                       \
    extern "C" __global__ void __launch_bounds__(APF_THREADS, MINB) attn_prefill_j##NJ(             \
        const float* __restrict__ qkv, int qkv_stride, int ntok, const int* __restrict__ pos,        \
        const int* __restrict__ slot, const int* __restrict__ block_table, int max_blocks,          \
        const kv_t* __restrict__ k_cache, const kv_t* __restrict__ v_cache, u64 layer_off,          \
        int block_size, int kv_dim, int n_heads, int G, int hd, float scale, float* __restrict__ out, \
        int out_stride) { PDL_WAIT();                                                                            \
        attn_prefill_body<NJ>(qkv, qkv_stride, ntok, pos, slot, block_table, max_blocks, k_cache,     \
                              v_cache, layer_off, block_size, kv_dim, n_heads, G, hd, scale, out,    \
                              out_stride);                                                           \
    }

// NJ = ceil(head_dim / 64) output dim groups per thread; two blocks per multiprocessor up to 128
APF_KERNEL(1, 2)
APF_KERNEL(2, 2)
APF_KERNEL(3, 1)
APF_KERNEL(4, 1)

// ---------------------------------------------------------------------------------------------
// LM head, stored dtype widened exactly, f32 accumulation: logits[i][v] = W[v] . xn[i] for
// i < nrows (at most 8 per launch). One warp per vocabulary row (grid-stride); with vec != 0
// (hidden % 8 == 0) lanes read 8 consecutive weights (16 bytes of bf16/f16) at a time.

#define LMH_ROWS 8

__device__ __forceinline__ void lmh_widen8(const u16* p, int kind, float (&w)[8]) {
    const uint4 v = __ldg((const uint4*)p);
    const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u16 lo = (u16)(words[i] & 0xffffu), hi = (u16)(words[i] >> 16);
        w[2 * i] = kind == 2 ? bf16_to_f32(lo) : f16_to_f32(lo);
        w[2 * i + 1] = kind == 2 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
}

__device__ __forceinline__ void lmh_load8(const void* W, int kind, u64 idx, float (&w)[8]) {
    if (kind == 0) {
        const float4 a = __ldg((const float4*)((const float*)W + idx));
        const float4 b = __ldg((const float4*)((const float*)W + idx + 4));
        w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
        w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else {
        lmh_widen8((const u16*)W + idx, kind, w);
    }
}

__device__ __forceinline__ float lmh_load1(const void* W, int kind, u64 idx) {
    if (kind == 0) return ((const float*)W)[idx];
    const u16 h = ((const u16*)W)[idx];
    return kind == 2 ? bf16_to_f32(h) : f16_to_f32(h);
}

// kind: 0 = f32, 1 = f16, 2 = bf16
extern "C" __global__ void __launch_bounds__(256) lm_head(const void* __restrict__ W, int kind,
                                                          int vocab, int hidden, int vec,
                                                          const float* __restrict__ xn, int nrows,
                                                          float* __restrict__ logits) { PDL_WAIT();
    const int lane = threadIdx.x & 31;
    const int wid = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (int v = wid; v < vocab; v += nwarps) {
        const u64 base = (u64)v * (u64)hidden;
        float acc[LMH_ROWS];
#pragma unroll
        for (int i = 0; i < LMH_ROWS; i++) acc[i] = 0.0f;
        if (vec) {
            for (int c = lane * 8; c < hidden; c += 256) {
                float w[8];
                lmh_load8(W, kind, base + c, w);
#pragma unroll
                for (int i = 0; i < LMH_ROWS; i++) {
                    if (i < nrows) {
                        const float4 xa = *(const float4*)(xn + (u64)i * (u64)hidden + c);
                        const float4 xb = *(const float4*)(xn + (u64)i * (u64)hidden + c + 4);
                        float a = acc[i];
                        a += w[0] * xa.x; a += w[1] * xa.y; a += w[2] * xa.z; a += w[3] * xa.w;
                        a += w[4] * xb.x; a += w[5] * xb.y; a += w[6] * xb.z; a += w[7] * xb.w;
                        acc[i] = a;
                    }
                }
            }
        } else {
            for (int c = lane; c < hidden; c += 32) {
                const float w = lmh_load1(W, kind, base + c);
#pragma unroll
                for (int i = 0; i < LMH_ROWS; i++) {
                    if (i < nrows) acc[i] += w * xn[(u64)i * (u64)hidden + c];
                }
            }
        }
#pragma unroll
        for (int i = 0; i < LMH_ROWS; i++) {
            if (i < nrows) {
                const float s = warp_sum_f(acc[i]);
                if (lane == 0) logits[(u64)i * (u64)vocab + v] = s;
            }
        }
    }
}

// LM head on the tensor cores for bf16 weights (2B-4T's embedding / head): logits[n][v] =
// W[v] . xn[n] to f32 accuracy. Each staged value of xn is split exactly into three bf16 parts,
// x = hi + mid + lo (8 + 8 + 8 significant bits): a bf16 weight times a part is exact in the
// mma's f32 products, so the sum over the three parts is the f32 dot product up to summation
// order (as any parallel reduction). Block: 8 warps, warp w owns vocabulary rows
// v0 = 16 (8 blockIdx.x + w) .. v0 + 16 (mma.m16n8k16 bf16, A = W rows, B = 8 tokens of a part);
// the warps share each 128-column chunk of xn, staged split in shared memory
// ([3][NT * 8][LMT_KC + LMT_PAD] u16). As in pack.rs the k labels are permuted so that lane
// (g, t) loads 8 consecutive columns [k0 + 8t, k0 + 8t + 8) of its rows for two k-steps, and the
// matching 8 columns of its token from shared memory (one 16-byte load each).
#define LMT_WARPS 8
#define LMT_KC 128
#define LMT_PAD 32  // elements: rows 320 bytes apart keep the 16-byte reads of 8 lanes conflict-free

__device__ __forceinline__ u16 f32_to_bf16_rn(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int NT>
__device__ __forceinline__ void lm_head_mma_body(const u16* __restrict__ W, int vocab, int hidden,
                                                 const float* __restrict__ xn, int ntok,
                                                 float* __restrict__ logits) {
    extern __shared__ __align__(16) u16 lmt_sm[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int rs = LMT_KC + LMT_PAD;
    const int ptok = NT * 8;  // staged token rows per part
    const int v0 = (blockIdx.x * LMT_WARPS + warp) * 16;
    // rows past the vocabulary read the last row (valid memory) and are never stored
    const u16* w0 = W + (u64)min(v0 + g, vocab - 1) * (u64)hidden + 8 * tq;
    const u16* w1 = W + (u64)min(v0 + g + 8, vocab - 1) * (u64)hidden + 8 * tq;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;

    for (int k0 = 0; k0 < hidden; k0 += LMT_KC) {
        const int kc = min(LMT_KC, hidden - k0);  // a multiple of 32
        uint4 wa[LMT_KC / 32], wb[LMT_KC / 32];
#pragma unroll
        for (int j = 0; j < LMT_KC / 32; j++) {
            if (j * 32 < kc) {
                wa[j] = __ldg((const uint4*)(w0 + k0 + 32 * j));
                wb[j] = __ldg((const uint4*)(w1 + k0 + 32 * j));
            }
        }
        __syncthreads();  // the previous chunk is consumed
        const int q4 = kc / 4;  // float4s per token row of the chunk
#pragma unroll 4
        for (int i = threadIdx.x; i < ptok * q4; i += blockDim.x) {
            const int n = i / q4, c = 4 * (i - n * q4);
            const float4 x4 = n < ntok ? __ldg((const float4*)(xn + (u64)n * (u64)hidden + k0 + c))
                                       : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            const float xv[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const u16 hi = f32_to_bf16_rn(xv[e]);
                const float r1 = xv[e] - bf16_to_f32(hi);
                const u16 mid = f32_to_bf16_rn(r1);
                const u16 lo = f32_to_bf16_rn(r1 - bf16_to_f32(mid));
                lmt_sm[(0 * ptok + n) * rs + c + e] = hi;
                lmt_sm[(1 * ptok + n) * rs + c + e] = mid;
                lmt_sm[(2 * ptok + n) * rs + c + e] = lo;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < LMT_KC / 32; j++) {
            if (j * 32 < kc) {
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                    for (int p = 0; p < 3; p++) {
                        const uint4 b = *(const uint4*)(lmt_sm + (p * ptok + nt * 8 + g) * rs + 32 * j + 8 * tq);
                        mma_bf16(acc[nt], wa[j].x, wb[j].x, wa[j].y, wb[j].y, b.x, b.y);
                        mma_bf16(acc[nt], wa[j].z, wb[j].z, wa[j].w, wb[j].w, b.z, b.w);
                    }
                }
            }
        }
    }
    // c0, c1: row g, tokens 2tq, 2tq+1; c2, c3: row g + 8
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int n = nt * 8 + 2 * tq;
        const int ra = v0 + g, rb = v0 + g + 8;
        if (ra < vocab) {
            if (n < ntok) logits[(u64)n * (u64)vocab + ra] = acc[nt][0];
            if (n + 1 < ntok) logits[(u64)(n + 1) * (u64)vocab + ra] = acc[nt][1];
        }
        if (rb < vocab) {
            if (n < ntok) logits[(u64)n * (u64)vocab + rb] = acc[nt][2];
            if (n + 1 < ntok) logits[(u64)(n + 1) * (u64)vocab + rb] = acc[nt][3];
        }
    }
}

#define LMT_KERNEL(NT)                                                                            \
    extern "C" __global__ void __launch_bounds__(LMT_WARPS * 32) lm_head_bf16_nt##NT(             \
        const u16* __restrict__ W, int vocab, int hidden, const float* __restrict__ xn, int ntok, \
        float* __restrict__ logits) { PDL_WAIT();                                                             \
        lm_head_mma_body<NT>(W, vocab, hidden, xn, ntok, logits);                                 \
    }

LMT_KERNEL(1)
LMT_KERNEL(2)
LMT_KERNEL(4)
LMT_KERNEL(8)

// ---------------------------------------------------------------------------------------------
// Sampling on the device, one block (SAMPLE_THREADS) per logit row; only token ids go back.
// Greedy (temperature <= 0 or top_k == 1): argmax, ties to the lowest id, NaN never wins, 0 when
// nothing is above -inf. Otherwise: weights e_i = exp((l_i - max) / T) over the set
// { l_i >= theta }, where theta is the k-th largest logit (top_k > 0; ties with it kept), raised
// to the largest value whose set still holds top_p of the mass (top_p < 1); then the token
// where the running sum in id order first exceeds u * total (u in [0, 1) from the host).
// Thresholds are found by bisection over an order-preserving integer key of the float.

struct SampleParam {
    float temperature;
    int top_k;
    float top_p;
    float u;
};

__device__ __forceinline__ u32 okey(float f) {
    if (f != f) return 0u;  // NaN: below everything, never selected (thresholds are >= 1)
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ int block_count_ge(const float* l, int vocab, u32 key) {
    int c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += okey(l[i]) >= key ? 1 : 0;
    return block_sum_i(c);
}

__device__ float block_mass_ge(const float* l, int vocab, u32 key, float mx, float invT) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = l[i];
        if (okey(v) >= key) s += expf((v - mx) * invT);
    }
    return block_sum_f(s);
}

#define SAMPLE_THREADS 512

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
    const float* __restrict__ logits, int vocab, const SampleParam* __restrict__ params,
    u32* __restrict__ out_tokens) { PDL_WAIT();
    __shared__ float s_bv[32];
    __shared__ int s_bi[32];
    __shared__ float s_scan[SAMPLE_THREADS];
    __shared__ int s_pick;
    const int r = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = blockDim.x >> 5;
    const float* l = logits + (u64)r * (u64)vocab;
    const SampleParam sp = params[r];

    // argmax: per thread in ascending id order (strict >: the first maximum), then merged
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    if ((vocab & 3) == 0) {
        // 16-byte loads, 4 in flight per thread (a plain loop is one memory latency per value)
        const float4* l4 = (const float4*)l;
        const int n4 = vocab >> 2;
        for (int i0 = tid; i0 < n4; i0 += 4 * (int)blockDim.x) {
            float4 q[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = i0 + u * (int)blockDim.x;
                q[u] = i < n4 ? __ldg(l4 + i) : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
            }
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = 4 * (i0 + u * (int)blockDim.x);
                const float v[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    if (v[e] > bv) {  // ascending ids within the thread: the first maximum
                        bv = v[e];
                        bi = i + e;
                    }
                }
            }
        }
    } else {
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float v = l[i];
            if (v > bv) {
                bv = v;
                bi = i;
            }
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        s_bv[w] = bv;
        s_bi[w] = bi;
    }
    __syncthreads();
    if (w == 0) {
        bv = lane < nw ? s_bv[lane] : NEG_INF;
        bi = lane < nw ? s_bi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, bv, o);
            const int oi = __shfl_xor_sync(FULL_MASK, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0) {
            s_bv[0] = bv;
            s_bi[0] = bi;
        }
    }
    __syncthreads();
    bv = s_bv[0];
    bi = s_bi[0];
    const int argmax = bi == 0x7fffffff ? 0 : bi;
    if (!(sp.temperature > 0.0f) || sp.top_k == 1 || bi == 0x7fffffff) {
        if (tid == 0) out_tokens[r] = (u32)argmax;
        return;
    }
    const float mx = bv;
    const float invT = 1.0f / sp.temperature;
    const u32 kmax = okey(mx);

    u32 th = 1u;
    if (sp.top_k > 0 && block_count_ge(l, vocab, 1u) > sp.top_k) {
        u32 lo = 1u, hi = kmax;  // invariant: count(>= lo) >= top_k
        while (lo < hi) {
            const u32 mid = lo + ((hi - lo + 1u) >> 1);
            if (block_count_ge(l, vocab, mid) >= sp.top_k) {
                lo = mid;
            } else {
                hi = mid - 1u;
            }
        }
        th = lo;
    }
    if (sp.top_p < 1.0f) {
        const float target = sp.top_p * block_mass_ge(l, vocab, th, mx, invT);
        u32 lo = th, hi = kmax;  // invariant: mass(>= lo) >= target
        while (lo < hi) {
            const u32 mid = lo + ((hi - lo + 1u) >> 1);
            if (block_mass_ge(l, vocab, mid, mx, invT) >= target) {
                lo = mid;
            } else {
                hi = mid - 1u;
            }
        }
        th = lo;
    }

    // the draw: contiguous segments per thread, a block scan of their sums, then one walk
    const int seg = (vocab + (int)blockDim.x - 1) / (int)blockDim.x;
    const int s0 = min(tid * seg, vocab), s1 = min(s0 + seg, vocab);
    float local = 0.0f;
    for (int i = s0; i < s1; i++) {
        const float v = l[i];
        if (okey(v) >= th) local += expf((v - mx) * invT);
    }
    s_scan[tid] = local;
    if (tid == 0) s_pick = argmax;  // fallback (always in the set)
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {
        const float add = tid >= off ? s_scan[tid - off] : 0.0f;
        __syncthreads();
        s_scan[tid] += add;
        __syncthreads();
    }
    const float total = s_scan[blockDim.x - 1];
    const float target = sp.u * total;
    const float before = tid > 0 ? s_scan[tid - 1] : 0.0f;
    if (local > 0.0f && target >= before && target < s_scan[tid]) {
        float run = before;
        int found = -1, last = -1;
        for (int i = s0; i < s1; i++) {
            const float v = l[i];
            if (okey(v) >= th) {
                const float e = expf((v - mx) * invT);
                if (e > 0.0f) last = i;
                run += e;
                if (run > target) {
                    found = i;
                    break;
                }
            }
        }
        const int pick = found >= 0 ? found : last;
        if (pick >= 0) s_pick = pick;
    }
    __syncthreads();
    if (tid == 0) out_tokens[r] = (u32)s_pick;
}
