// Kino's fused CUDA kernels for the Wan transformer block (feature `cuda`; loaded by
// `kernels/cuda.rs`). Each replaces a chain of candle element-wise ops (every one a full pass
// over [B, N, D] through memory, broadcasts through strided indexing) with one pass, and keeps
// the reference's arithmetic: f32 maths, one rounding to the storage type where PyTorch rounds.
// Compiled to PTX by kino-engine's build.rs with `-fmad=false`, so `a * b + c` rounds twice as
// PyTorch's separate kernels do (no fused multiply-add the reference does not have).
//
// T is the storage type of activations: __nv_bfloat16, __half or float. Modulation tensors
// (scale, shift, gate) are f32 rows of D with a batch stride and a token stride in elements
// (token stride 0: one row per batch element, the [B, 1, D] case; D or more: per-token rows).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float *shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = lane < warps ? shared[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
    return t;
}

// out = T((LayerNorm(x.float()) * (1 + scale) + shift))   (one_plus != 0, diffusers' norm1/norm3)
// out = T((LayerNorm(x.float()) * scale + shift))         (one_plus == 0, the affine norm2)
// LayerNorm without affine, biased variance, eps inside the square root. One block per row.
template <typename T>
__device__ void modulated_layer_norm(const T *x, T *out, const float *scale, const float *shift,
                                     int64_t rows, int64_t n, int64_t d,
                                     int64_t sc_b, int64_t sc_n, int64_t sh_b, int64_t sh_n,
                                     float eps, int one_plus) {
    __shared__ float shared[32];
    const int64_t row = blockIdx.x;
    if (row >= rows) return;
    const T *xr = x + row * d;
    T *yr = out + row * d;
    const int64_t b = row / n, t = row % n;
    const float *sc = scale + b * sc_b + t * sc_n;
    const float *sh = shift + b * sh_b + t * sh_n;
    float s = 0.f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) s += to_f(xr[i]);
    const float mean = block_sum(s, shared) / (float)d;
    float v = 0.f;
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = to_f(xr[i]) - mean;
        v += c * c;
    }
    const float var = block_sum(v, shared) / (float)d;
    const float rstd = rsqrtf(var + eps);
    for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
        const float nrm = (to_f(xr[i]) - mean) * rstd;
        const float m = one_plus ? 1.f + sc[i] : sc[i];
        yr[i] = from_f<T>(nrm * m + sh[i]);
    }
}

// out = T(x.float() + y.float() * gate)   (diffusers' gated residuals)
template <typename T>
__device__ void gated_residual(const T *x, const T *y, const float *gate, T *out, int64_t numel,
                               int64_t n, int64_t d, int64_t g_b, int64_t g_n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / d, c = i % d;
        const float g = gate[(row / n) * g_b + (row % n) * g_n + c];
        const float p = to_f(y[i]) * g;
        out[i] = from_f<T>(to_f(x[i]) + p);
    }
}

// out = T(y + bias), then (act == 1) out = T(gelu_tanh(out)): a Linear layer's bias after the
// matmul, and the FFN's GELU(approximate="tanh") as PyTorch computes it on bf16 (in f32).
template <typename T>
__device__ void bias_act(const T *y, const T *bias, T *out, int64_t numel, int64_t d, int act) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < numel;
         i += (int64_t)gridDim.x * blockDim.x) {
        float v = to_f(from_f<T>(to_f(y[i]) + to_f(bias[i % d])));
        if (act == 1) {
            const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
            const float k1 = 0.044715f;
            const float cube = v * v * v;  // PyTorch's order: x * x * x, then kappa * cube
            const float inner = k0 * (v + k1 * cube);
            v = 0.5f * v * (1.f + tanhf(inner));
        }
        out[i] = from_f<T>(v);
    }
}

// Interleaved RoPE (diffusers' Wan `apply_rotary_emb`): x [rows, heads, head_dim] with pairs
// (2j, 2j+1); cos, sin f32 [rows, head_dim / 2]; maths in f32, one rounding per output.
template <typename T>
__device__ void rope_i(const T *x, const float *cos, const float *sin, T *out, int64_t rows,
                       int64_t heads, int64_t half) {
    const int64_t pairs = rows * heads * half;
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pairs;
         p += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = p % half, row = p / (heads * half);
        const float c = cos[row * half + j], s = sin[row * half + j];
        const float x1 = to_f(x[2 * p]), x2 = to_f(x[2 * p + 1]);
        const float a = x1 * c, b = x2 * s, e = x1 * s, f = x2 * c;
        out[2 * p] = from_f<T>(a - b);
        out[2 * p + 1] = from_f<T>(e + f);
    }
}

#define KINO_INSTANCES(T, SUFFIX)                                                                  \
    extern "C" __global__ void modulated_layer_norm_##SUFFIX(                                     \
        const T *x, T *out, const float *scale, const float *shift, int64_t rows, int64_t n,      \
        int64_t d, int64_t sc_b, int64_t sc_n, int64_t sh_b, int64_t sh_n, float eps,            \
        int one_plus) {                                                                            \
        modulated_layer_norm<T>(x, out, scale, shift, rows, n, d, sc_b, sc_n, sh_b, sh_n, eps,   \
                                one_plus);                                                        \
    }                                                                                              \
    extern "C" __global__ void gated_residual_##SUFFIX(const T *x, const T *y, const float *gate, \
                                                       T *out, int64_t numel, int64_t n,          \
                                                       int64_t d, int64_t g_b, int64_t g_n) {     \
        gated_residual<T>(x, y, gate, out, numel, n, d, g_b, g_n);                                \
    }                                                                                              \
    extern "C" __global__ void bias_act_##SUFFIX(const T *y, const T *bias, T *out, int64_t numel,\
                                                 int64_t d, int act) {                            \
        bias_act<T>(y, bias, out, numel, d, act);                                                  \
    }                                                                                              \
    extern "C" __global__ void rope_i_##SUFFIX(const T *x, const float *cos, const float *sin,   \
                                               T *out, int64_t rows, int64_t heads,               \
                                               int64_t half) {                                    \
        rope_i<T>(x, cos, sin, out, rows, heads, half);                                            \
    }

KINO_INSTANCES(__nv_bfloat16, bf16)
KINO_INSTANCES(__half, f16)
KINO_INSTANCES(float, f32)
