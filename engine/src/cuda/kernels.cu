// tandem's CUDA kernels: the Llama-family forward pass over paged f16 KV blocks.
//
// Compiled at load time by NVRTC for the device's own architecture
// (--gpu-architecture=sm_XY), so this file includes no headers: f16 and bf16
// conversions and dp4a are written with inline PTX, and everything else is
// built in to NVRTC (warp shuffles, float and double math).
//
// Every entry point declares the block size it is launched with
// (__launch_bounds__), so the compiler never uses more registers than such a
// block can have.
//
// Conventions, shared with src/cuda/mod.rs (which launches every entry point
// below and whose tests check that each one is declared here):
// - activations are f32, row-major: token t's row of `cols` at x[t * cols];
// - a matrix product writes out[t * rows + r] (token-major, like the CPU's);
// - weights are the GGUF bytes unchanged: row r at w[r * row_bytes];
// - the KV pool is the documented block layout (src/kv_cache.rs), f16:
//   block b, layer l, K at b * block_elems + l * piece_elems, V half_elems
//   after K, each [slot][kv_head][head_dim];
// - quantized products first quantize the activations to 32-element Q8 blocks
//   with the CPU's rounding (scale max|x|/127, round half to even, scale and
//   scaled sum at f16 precision), then take integer dot products, so each
//   block's contribution equals the CPU kernels' bit for bit and only the
//   order of the float sums differs.

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)
#define FULL_MASK 0xffffffffu

// ggml type ids (GgmlType::from_id).
#define TY_F32 0
#define TY_F16 1
#define TY_Q4_0 2
#define TY_Q4_1 3
#define TY_Q8_0 8
#define TY_BF16 30

// Tokens per matrix-product tile: each weight block is loaded once per tile
// and dotted with up to this many tokens' activations.
#define MM_TOKENS 8
// Query heads per KV head and head_dim / 32 the attention kernels hold in
// registers (the host refuses models beyond these).
#define MAX_GROUP 8
#define MAX_LANE_ELEMS 8
// Warps of the decode attention block; keys per shared-memory chunk and query
// tokens per block of the prefill attention.
#define ATTN_DECODE_WARPS 4
#define ATTN_KEY_CHUNK 32
#define ATTN_PREFILL_TOKENS 8

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// One quantized block of 32 activations (the CPU's ActBlock): value = qs[i] * d,
// sum = sum of qs, s = d * sum rounded to f16. qs packed four to an int.
struct Q8Act {
    float d;
    float s;
    int sum;
    int qs[8];
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf2f(u16 b) {
    return __int_as_float(((u32)b) << 16);
}

// Rounds to f16 precision and back (the CPU's f16_round).
__device__ __forceinline__ float f16_round(float f) {
    return h2f(f2h(f));
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ u16 load_u16(const u8* p) {
    return *(const u16*)p;
}

// Two 2-byte-aligned halves as one little-endian word.
__device__ __forceinline__ int load_i32_2(const u8* p) {
    const u16* h = (const u16*)p;
    return (int)((u32)h[0] | ((u32)h[1] << 16));
}

// Element i of a GGUF row of type ty, as f32 (the CPU's dequantize_row).
__device__ __forceinline__ float dequant(int ty, const u8* row, i64 i) {
    switch (ty) {
    case TY_F32:
        return ((const float*)row)[i];
    case TY_F16:
        return h2f(((const u16*)row)[i]);
    case TY_BF16:
        return bf2f(((const u16*)row)[i]);
    case TY_Q4_0: {
        const u8* b = row + (i / 32) * 18;
        int j = (int)(i % 32);
        u8 byte = b[2 + (j & 15)];
        int q = j < 16 ? (byte & 15) : (byte >> 4);
        return __fmul_rn((float)(q - 8), h2f(load_u16(b)));
    }
    case TY_Q4_1: {
        const u8* b = row + (i / 32) * 20;
        int j = (int)(i % 32);
        u8 byte = b[4 + (j & 15)];
        int q = j < 16 ? (byte & 15) : (byte >> 4);
        return __fadd_rn(__fmul_rn((float)q, h2f(load_u16(b))), h2f(load_u16(b + 2)));
    }
    case TY_Q8_0: {
        const u8* b = row + (i / 32) * 34;
        int j = (int)(i % 32);
        return __fmul_rn((float)(signed char)b[2 + j], h2f(load_u16(b)));
    }
    default:
        return 0.0f;
    }
}

// ---------------------------------------------------------------------------
// Activation quantization: one warp per 32-element block.

extern "C" __global__ void __launch_bounds__(256) quantize_q8(const float* __restrict__ x, Q8Act* __restrict__ out,
                                       int n_blocks) {
    int blk = (int)((blockIdx.x * blockDim.x + threadIdx.x) / WARP);
    int lane = threadIdx.x % WARP;
    if (blk >= n_blocks) return;  // uniform per warp
    float v = x[(i64)blk * 32 + lane];
    float amax = warp_max(fabsf(v));
    float d = __fdiv_rn(amax, 127.0f);
    float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
    int q = __float2int_rn(__fmul_rn(v, id));
    q = imax(-128, imin(127, q));
    int sum = warp_sum_int(q);
    ((signed char*)out[blk].qs)[lane] = (signed char)q;
    if (lane == 0) {
        out[blk].d = f16_round(d);
        out[blk].s = f16_round(__fmul_rn((float)sum, d));
        out[blk].sum = sum;
    }
}

// ---------------------------------------------------------------------------
// Matrix products on quantized weights. One warp per weight row, lanes over
// the row's 32-element blocks; blockIdx.y picks a tile of MM_TOKENS tokens.
// A decode step (n up to a tile) reads every weight once; a prefill of n
// tokens reads each weight n / MM_TOKENS times, mostly from L2.
// (A tensor-core tiled kernel for large n is the next step for prefill speed.)

template <int TY>
__device__ __forceinline__ void mm_q(const u8* __restrict__ w, const Q8Act* __restrict__ x,
                                     float* __restrict__ out, int rows, int cols, int n) {
    const int bbytes = TY == TY_Q4_0 ? 18 : (TY == TY_Q4_1 ? 20 : 34);
    int nb = cols / 32;
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    int t0 = blockIdx.y * MM_TOKENS;
    if (row >= rows) return;  // uniform per warp
    int tn = imin(MM_TOKENS, n - t0);
    const u8* wr = w + (i64)row * nb * bbytes;
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; ++t) acc[t] = 0.0f;

    for (int b = lane; b < nb; b += WARP) {
        const u8* wb = wr + (i64)b * bbytes;
        int q[8];
        float d, m = 0.0f;
        if (TY == TY_Q8_0) {
            d = h2f(load_u16(wb));
#pragma unroll
            for (int k = 0; k < 8; ++k) q[k] = load_i32_2(wb + 2 + 4 * k);
        } else {
            const u8* qs = wb + (TY == TY_Q4_0 ? 2 : 4);
            d = h2f(load_u16(wb));
            if (TY == TY_Q4_1) m = h2f(load_u16(wb + 2));
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                int word = load_i32_2(qs + 4 * k);
                q[k] = word & 0x0f0f0f0f;            // elements 4k..4k+3
                q[k + 4] = (word >> 4) & 0x0f0f0f0f; // elements 16+4k..16+4k+3
            }
        }
#pragma unroll
        for (int t = 0; t < MM_TOKENS; ++t) {
            if (t < tn) {
                const Q8Act* a = x + (i64)(t0 + t) * nb + b;
                int isum = 0;
#pragma unroll
                for (int k = 0; k < 8; ++k) isum = dp4a(q[k], a->qs[k], isum);
                float ad = a->d;
                if (TY == TY_Q4_0) {
                    acc[t] += d * ad * (float)(isum - 8 * a->sum);
                } else if (TY == TY_Q4_1) {
                    acc[t] += d * ad * (float)isum + m * a->s;
                } else {
                    acc[t] += d * ad * (float)isum;
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOKENS; ++t) {
        float s = warp_sum(acc[t]);
        if (lane == 0 && t < tn) out[(i64)(t0 + t) * rows + row] = s;
    }
}

// Float weights (F32, F16, BF16): lanes stride over the row's elements.
template <int TY>
__device__ __forceinline__ void mm_f(const u8* __restrict__ w, const float* __restrict__ x,
                                     float* __restrict__ out, int rows, int cols, int n) {
    int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    int t0 = blockIdx.y * MM_TOKENS;
    if (row >= rows) return;
    int tn = imin(MM_TOKENS, n - t0);
    const i64 esize = TY == TY_F32 ? 4 : 2;
    const u8* wr = w + (i64)row * cols * esize;
    float acc[MM_TOKENS];
#pragma unroll
    for (int t = 0; t < MM_TOKENS; ++t) acc[t] = 0.0f;
    for (int i = lane; i < cols; i += WARP) {
        float wv;
        if (TY == TY_F32) {
            wv = ((const float*)wr)[i];
        } else if (TY == TY_F16) {
            wv = h2f(((const u16*)wr)[i]);
        } else {
            wv = bf2f(((const u16*)wr)[i]);
        }
#pragma unroll
        for (int t = 0; t < MM_TOKENS; ++t) {
            if (t < tn) acc[t] += wv * x[(i64)(t0 + t) * cols + i];
        }
    }
#pragma unroll
    for (int t = 0; t < MM_TOKENS; ++t) {
        float s = warp_sum(acc[t]);
        if (lane == 0 && t < tn) out[(i64)(t0 + t) * rows + row] = s;
    }
}

extern "C" __global__ void __launch_bounds__(128) mm_q4_0(const u8* w, const Q8Act* x, float* out, int rows, int cols,
                                   int n) {
    mm_q<TY_Q4_0>(w, x, out, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128) mm_q4_1(const u8* w, const Q8Act* x, float* out, int rows, int cols,
                                   int n) {
    mm_q<TY_Q4_1>(w, x, out, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128) mm_q8_0(const u8* w, const Q8Act* x, float* out, int rows, int cols,
                                   int n) {
    mm_q<TY_Q8_0>(w, x, out, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128) mm_f32(const u8* w, const float* x, float* out, int rows, int cols,
                                  int n) {
    mm_f<TY_F32>(w, x, out, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128) mm_f16(const u8* w, const float* x, float* out, int rows, int cols,
                                  int n) {
    mm_f<TY_F16>(w, x, out, rows, cols, n);
}

extern "C" __global__ void __launch_bounds__(128) mm_bf16(const u8* w, const float* x, float* out, int rows, int cols,
                                   int n) {
    mm_f<TY_BF16>(w, x, out, rows, cols, n);
}

// ---------------------------------------------------------------------------
// Element-wise and row kernels.

// One block per token: its embedding row, dequantized. Token ids past the
// vocabulary are clamped to the last row, as on the CPU.
extern "C" __global__ void __launch_bounds__(256) embed(const u8* __restrict__ table, int ty, i64 row_bytes,
                                 const u32* __restrict__ tokens, float* __restrict__ x, int d,
                                 int vocab) {
    int t = blockIdx.x;
    u32 tok = tokens[t];
    if (tok > (u32)(vocab - 1)) tok = (u32)(vocab - 1);
    const u8* row = table + (i64)tok * row_bytes;
    for (int i = threadIdx.x; i < d; i += blockDim.x) x[(i64)t * d + i] = dequant(ty, row, i);
}

// One block per row: out = x / rms(x) * w, the sum of squares in f64 as on the CPU.
extern "C" __global__ void __launch_bounds__(256) rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, int d, float eps) {
    __shared__ double partial[32];
    __shared__ float scale_s;
    const float* xr = x + (i64)blockIdx.x * d;
    double ss = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        double v = (double)xr[i];
        ss += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(FULL_MASK, ss, o);
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        int nw = (blockDim.x + WARP - 1) / WARP;
        for (int i = 0; i < nw; ++i) total += partial[i];
        scale_s = (float)(1.0 / sqrt(total / (double)d + (double)eps));
    }
    __syncthreads();
    float scale = scale_s;
    float* orow = out + (i64)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        orow[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
    }
}

// Greedy readout, one block per row of `logits` (`vocab` wide): the first
// index of the largest value (NaNs never win nor count; 0 for a row with no
// number above -inf) and its log-probability under the raw distribution,
// logits[id] - ln sum_j exp(logits[j]), as the host's greedy_pick computes it
// up to the order of the sum.
extern "C" __global__ void __launch_bounds__(256) argmax_logprob(const float* __restrict__ logits, int vocab,
                                          unsigned* __restrict__ ids, float* __restrict__ logprobs) {
    __shared__ float best_w[32];
    __shared__ int at_w[32];
    __shared__ float sum_w[32];
    __shared__ float max_s;
    __shared__ int id_s;
    const float* x = logits + (i64)blockIdx.x * vocab;
    float best = NEG_INF;
    int at = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = x[i];
        if (v > best) {
            best = v;
            at = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float ob = __shfl_xor_sync(FULL_MASK, best, o);
        int oa = __shfl_xor_sync(FULL_MASK, at, o);
        if (ob > best || (ob == best && oa < at)) {
            best = ob;
            at = oa;
        }
    }
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int nw = (blockDim.x + WARP - 1) / WARP;
    if (lane == 0) {
        best_w[warp] = best;
        at_w[warp] = at;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; ++w) {
            if (best_w[w] > best || (best_w[w] == best && at_w[w] < at)) {
                best = best_w[w];
                at = at_w[w];
            }
        }
        max_s = best;
        id_s = at == 0x7fffffff ? 0 : at;
    }
    __syncthreads();
    float m = max_s;
    bool finite = m > NEG_INF && m < -NEG_INF;
    float s = 0.0f;
    if (finite) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            float dl = x[i] - m;
            if (dl == dl) s += expf(dl);  // a NaN adds nothing, as on the host
        }
    }
    s = warp_sum(s);
    if (lane == 0) sum_w[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < nw; ++w) total += sum_w[w];
        float lse = finite ? m + (float)log(total) : m;
        ids[blockIdx.x] = (unsigned)id_s;
        logprobs[blockIdx.x] = x[id_s] - lse;
    }
}

// x[r * dim + i] += bias[i] for every row (Qwen2's q/k/v biases).
extern "C" __global__ void __launch_bounds__(256) add_bias(float* __restrict__ x, const float* __restrict__ bias,
                                    i64 total, int dim) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += bias[i % dim];
}

// x += y (the residual stream).
extern "C" __global__ void __launch_bounds__(256) add_inplace(float* __restrict__ x, const float* __restrict__ y,
                                       i64 total) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) x[i] += y[i];
}

// out = silu(gate) * up.
extern "C" __global__ void __launch_bounds__(256) silu_mul(const float* __restrict__ gate, const float* __restrict__ up,
                                    float* __restrict__ out, i64 total) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) {
        float g = gate[i];
        out[i] = __fmul_rn(__fdiv_rn(g, 1.0f + expf(-g)), up[i]);
    }
}

// Rotates every head of each token's row by the token's position, the CPU's
// way: angle = pos * inv_freq[i] in f64, then cos/sin rounded to f32. `neox`
// pairs element i with i + half (Qwen2); otherwise 2i with 2i + 1 (Llama).
// One block per token.
extern "C" __global__ void __launch_bounds__(256) rope(float* __restrict__ x, const int* __restrict__ pos,
                                const double* __restrict__ inv_freq, int n_heads, int hd,
                                int half, int neox) {
    int t = blockIdx.x;
    double p = (double)pos[t];
    float* row = x + (i64)t * n_heads * hd;
    for (int idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
        int h = idx / half, i = idx % half;
        double s, c;
        sincos(p * inv_freq[i], &s, &c);
        float cs = (float)c, sn = (float)s;
        float* head = row + h * hd;
        int ia = neox ? i : 2 * i;
        int ib = neox ? i + half : 2 * i + 1;
        float a = head[ia], b = head[ib];
        head[ia] = __fsub_rn(__fmul_rn(a, cs), __fmul_rn(b, sn));
        head[ib] = __fadd_rn(__fmul_rn(a, sn), __fmul_rn(b, cs));
    }
}

// Writes each token's K and V (f32 rows of kv_dim) into its slot of the pool as
// f16. dst[t] is the element offset of the token's slot in layer 0's K.
extern "C" __global__ void __launch_bounds__(256) kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    u16* __restrict__ pool, const i64* __restrict__ dst,
                                    i64 layer_off, i64 half_elems, int kv_dim) {
    int t = blockIdx.x;
    i64 base = dst[t] + layer_off;
    for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        pool[base + i] = f2h(k[(i64)t * kv_dim + i]);
        pool[base + half_elems + i] = f2h(v[(i64)t * kv_dim + i]);
    }
}

// out[i] = x[rows[i]] (the rows whose logits are wanted).
extern "C" __global__ void __launch_bounds__(256) gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                       float* __restrict__ out, int d) {
    int r = blockIdx.x;
    const float* src = x + (i64)rows[r] * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) out[(i64)r * d + i] = src[i];
}

// ---------------------------------------------------------------------------
// Paged attention. Token t attends to positions 0..=pos[t] of its sequence,
// whose block table is tables[table_off[t]..]; position j lives in block
// tables[table_off[t] + j / bs], slot j % bs. Each block of threads serves one
// KV head and all `group` query heads that share it, so every K/V element is
// read once per group. Softmax is computed online (running max and sum), in
// f32, with scores scaled by `scale` = 1/sqrt(head_dim) as on the CPU.

struct OnlineSoftmax {
    float m[MAX_GROUP];
    float l[MAX_GROUP];
    float acc[MAX_GROUP][MAX_LANE_ELEMS];
};

__device__ __forceinline__ void softmax_init(OnlineSoftmax& st) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        st.m[g] = NEG_INF;
        st.l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < MAX_LANE_ELEMS; ++e) st.acc[g][e] = 0.0f;
    }
}

// Folds one key/value (this lane's elements in kr/vr) into every head's state.
__device__ __forceinline__ void softmax_step(OnlineSoftmax& st, const float (&qr)[MAX_GROUP][MAX_LANE_ELEMS],
                                             const float (&kr)[MAX_LANE_ELEMS],
                                             const float (&vr)[MAX_LANE_ELEMS], int group,
                                             float scale) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        if (g < group) {
            float s = 0.0f;
#pragma unroll
            for (int e = 0; e < MAX_LANE_ELEMS; ++e) s += qr[g][e] * kr[e];
            s = warp_sum(s) * scale;
            float m_new = fmaxf(st.m[g], s);
            float corr = expf(st.m[g] - m_new);
            float p = expf(s - m_new);
            st.l[g] = st.l[g] * corr + p;
#pragma unroll
            for (int e = 0; e < MAX_LANE_ELEMS; ++e) st.acc[g][e] = st.acc[g][e] * corr + p * vr[e];
            st.m[g] = m_new;
        }
    }
}

__device__ __forceinline__ void load_q(float (&qr)[MAX_GROUP][MAX_LANE_ELEMS], const float* q,
                                       int t, int n_heads, int hd, int first_head, int group,
                                       int lane) {
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
        for (int e = 0; e < MAX_LANE_ELEMS; ++e) {
            int i = lane + WARP * e;
            qr[g][e] = (g < group && i < hd) ? q[((i64)t * n_heads + first_head + g) * hd + i] : 0.0f;
        }
    }
}

// Decode variant: one query token per block (a list of token indices, one per
// decoding sequence), grid (n_kv_heads, n_list). The block's warps split the
// keys, each keeping its own online softmax; the warps' states are merged at
// the end through shared memory.
extern "C" __global__ void __launch_bounds__(ATTN_DECODE_WARPS * WARP) attn_decode(const float* __restrict__ q, const u16* __restrict__ pool,
                                       float* __restrict__ out, const int* __restrict__ list,
                                       const int* __restrict__ pos,
                                       const int* __restrict__ table_off,
                                       const int* __restrict__ tables, i64 layer_off,
                                       i64 block_elems, i64 half_elems, int bs, int n_heads,
                                       int n_kv_heads, int hd, float scale) {
    __shared__ float sm_m[ATTN_DECODE_WARPS][MAX_GROUP];
    __shared__ float sm_l[ATTN_DECODE_WARPS][MAX_GROUP];
    __shared__ float sm_acc[ATTN_DECODE_WARPS][MAX_GROUP][MAX_LANE_ELEMS * WARP];
    int kvh = blockIdx.x;
    int t = list[blockIdx.y];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * hd;
    int ctx = pos[t] + 1;
    const int* table = tables + table_off[t];

    float qr[MAX_GROUP][MAX_LANE_ELEMS];
    load_q(qr, q, t, n_heads, hd, kvh * group, group, lane);
    OnlineSoftmax st;
    softmax_init(st);
    for (int j = warp; j < ctx; j += ATTN_DECODE_WARPS) {
        i64 base = (i64)table[j / bs] * block_elems + layer_off + (i64)(j % bs) * kv_dim +
                   (i64)kvh * hd;
        float kr[MAX_LANE_ELEMS], vr[MAX_LANE_ELEMS];
#pragma unroll
        for (int e = 0; e < MAX_LANE_ELEMS; ++e) {
            int i = lane + WARP * e;
            kr[e] = i < hd ? h2f(pool[base + i]) : 0.0f;
            vr[e] = i < hd ? h2f(pool[base + half_elems + i]) : 0.0f;
        }
        softmax_step(st, qr, kr, vr, group, scale);
    }
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        if (lane == 0) {
            sm_m[warp][g] = st.m[g];
            sm_l[warp][g] = st.l[g];
        }
#pragma unroll
        for (int e = 0; e < MAX_LANE_ELEMS; ++e) sm_acc[warp][g][lane + WARP * e] = st.acc[g][e];
    }
    __syncthreads();
    // Merge: warp 0 holds key 0, so the overall max is finite.
    for (int idx = threadIdx.x; idx < group * hd; idx += blockDim.x) {
        int g = idx / hd, i = idx % hd;
        float mx = NEG_INF;
        for (int w = 0; w < ATTN_DECODE_WARPS; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float l = 0.0f, a = 0.0f;
        for (int w = 0; w < ATTN_DECODE_WARPS; ++w) {
            float c = expf(sm_m[w][g] - mx);
            l += sm_l[w][g] * c;
            a += sm_acc[w][g][i] * c;
        }
        out[((i64)t * n_heads + kvh * group + g) * hd + i] = a / l;
    }
}

// Prefill variant: a tile of up to ATTN_PREFILL_TOKENS consecutive tokens of one
// sequence per block (tiles[2b] = first token index, tiles[2b + 1] = count),
// grid (n_kv_heads, n_tiles), one warp per query token. The block stages keys
// and values ATTN_KEY_CHUNK at a time in shared memory (dynamic: 2 * chunk *
// hd f16), read once from the pool for all its tokens and heads; each token
// stops at its own position (causal), which covers the sequence's earlier
// cached blocks and the chunk's own new ones alike.
extern "C" __global__ void __launch_bounds__(ATTN_PREFILL_TOKENS * WARP) attn_prefill(const float* __restrict__ q, const u16* __restrict__ pool,
                                        float* __restrict__ out, const int* __restrict__ tiles,
                                        const int* __restrict__ pos,
                                        const int* __restrict__ table_off,
                                        const int* __restrict__ tables, i64 layer_off,
                                        i64 block_elems, i64 half_elems, int bs, int n_heads,
                                        int n_kv_heads, int hd, float scale) {
    extern __shared__ u16 chunk[];
    u16* sk = chunk;
    u16* sv = chunk + ATTN_KEY_CHUNK * hd;
    int kvh = blockIdx.x;
    int first = tiles[2 * blockIdx.y];
    int count = tiles[2 * blockIdx.y + 1];
    int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    int group = n_heads / n_kv_heads;
    int kv_dim = n_kv_heads * hd;
    bool active = warp < count;
    int t = first + (active ? warp : 0);
    int ctx = pos[t] + 1;
    int max_ctx = pos[first + count - 1] + 1;
    const int* table = tables + table_off[first];

    float qr[MAX_GROUP][MAX_LANE_ELEMS];
    load_q(qr, q, t, n_heads, hd, kvh * group, group, lane);
    OnlineSoftmax st;
    softmax_init(st);
    for (int c0 = 0; c0 < max_ctx; c0 += ATTN_KEY_CHUNK) {
        int nk = imin(ATTN_KEY_CHUNK, max_ctx - c0);
        for (int idx = threadIdx.x; idx < nk * hd; idx += blockDim.x) {
            int j = c0 + idx / hd, i = idx % hd;
            i64 base = (i64)table[j / bs] * block_elems + layer_off + (i64)(j % bs) * kv_dim +
                       (i64)kvh * hd;
            sk[idx] = pool[base + i];
            sv[idx] = pool[base + half_elems + i];
        }
        __syncthreads();
        if (active) {
            int stop = imin(nk, ctx - c0);
            for (int jj = 0; jj < stop; ++jj) {
                float kr[MAX_LANE_ELEMS], vr[MAX_LANE_ELEMS];
#pragma unroll
                for (int e = 0; e < MAX_LANE_ELEMS; ++e) {
                    int i = lane + WARP * e;
                    kr[e] = i < hd ? h2f(sk[jj * hd + i]) : 0.0f;
                    vr[e] = i < hd ? h2f(sv[jj * hd + i]) : 0.0f;
                }
                softmax_step(st, qr, kr, vr, group, scale);
            }
        }
        __syncthreads();
    }
    if (active) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g < group) {
#pragma unroll
                for (int e = 0; e < MAX_LANE_ELEMS; ++e) {
                    int i = lane + WARP * e;
                    if (i < hd) out[((i64)t * n_heads + kvh * group + g) * hd + i] = st.acc[g][e] / st.l[g];
                }
            }
        }
    }
}
