# The batch-norm kernels, compiled twice by setup.py: once for baseline x86-64
# (kernels_baseline.pyx) and once with AVX2/FMA (kernels_avx2.pyx); the backend picks
# one at run time.  Everything below the `def` wrappers is plain C: no Python
# objects, the GIL released, OpenMP threads over fixed blocks.
#
# Data comes as a C-contiguous (N, C, M) channel view (fastbn/backends/base.py).
# Two layouts get their own loops: "rows" (M == 1: NHWC and 2-D data, vectorised
# across channels) and "runs" (M > 1: NCHW, vectorised along each contiguous run).
#
# Statistics: the reduction domain of every channel is cut into blocks fixed by the
# shape alone (never by the thread count).  Each block is reduced in one pass of
# shifted sums, sum(d) and sum(d*d) with d = x - (the block's first value), so the
# data streams from memory once.  Where that shift sits far from the block's mean
# (more than ILL_CONDITIONED variances away, which costs digits), the block is
# reduced again in two passes while it is still in cache: its mean, then sums
# centred on it.  Inner sums run in the data type over short stretches and are
# flushed into float64.  Blocks are then merged per channel, in block order, with
# Chan's formula in float64.  Same bits for any thread count; accurate when
# |mean| >> std.

import numpy as np
cimport numpy as cnp
from cython.parallel cimport prange, parallel
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastbn_omp_max_threads(void) { return omp_get_max_threads(); }
    static int fastbn_have_openmp(void) { return 1; }
    static int fastbn_thread_num(void) { return omp_get_thread_num(); }
    static int fastbn_team_size(void) { return omp_get_num_threads(); }
    /* Binds to the enclosing parallel block (a team of one outside any). */
    static void fastbn_barrier(void) {
        #pragma omp barrier
    }
    #else
    static int fastbn_omp_max_threads(void) { return 1; }
    static int fastbn_have_openmp(void) { return 0; }
    static int fastbn_thread_num(void) { return 0; }
    static int fastbn_team_size(void) { return 1; }
    static void fastbn_barrier(void) {}
    #endif
    """
    int fastbn_omp_max_threads() noexcept nogil
    int fastbn_have_openmp() noexcept nogil
    int fastbn_thread_num() noexcept nogil
    int fastbn_team_size() noexcept nogil
    void fastbn_barrier() noexcept nogil

cdef extern from *:
    """
    /* Non-temporal stores: an output too big to stay cached is written straight to
       memory, a whole cache line at a time, without first reading each line and
       without evicting the input that a later pass (or the caller) reads again.
       `dst` is aligned to 64 bytes. */
    #if defined(__AVX__)
    #include <immintrin.h>
    static void fastbn_stream_line_f32(float* dst, const float* src) {
        _mm256_stream_ps(dst, _mm256_loadu_ps(src));
        _mm256_stream_ps(dst + 8, _mm256_loadu_ps(src + 8));
    }
    static void fastbn_stream_line_f64(double* dst, const double* src) {
        _mm256_stream_pd(dst, _mm256_loadu_pd(src));
        _mm256_stream_pd(dst + 4, _mm256_loadu_pd(src + 4));
    }
    static void fastbn_stream_fence(void) { _mm_sfence(); }
    #define FASTBN_COPY_VECTORS \
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(d + i, _mm256_loadu_ps(s + i)); \
        if (i + 4 <= n) { _mm_storeu_ps(d + i, _mm_loadu_ps(s + i)); i += 4; }
    #define FASTBN_COPY_VECTORS_F64 \
        for (; i + 4 <= n; i += 4) _mm256_storeu_pd(d + i, _mm256_loadu_pd(s + i)); \
        if (i + 2 <= n) { _mm_storeu_pd(d + i, _mm_loadu_pd(s + i)); i += 2; }
    #elif defined(__SSE2__)
    #include <emmintrin.h>
    static void fastbn_stream_line_f32(float* dst, const float* src) {
        for (int i = 0; i < 16; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    }
    static void fastbn_stream_line_f64(double* dst, const double* src) {
        for (int i = 0; i < 8; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
    }
    static void fastbn_stream_fence(void) { _mm_sfence(); }
    #define FASTBN_COPY_VECTORS \
        for (; i + 4 <= n; i += 4) _mm_storeu_ps(d + i, _mm_loadu_ps(s + i));
    #define FASTBN_COPY_VECTORS_F64 \
        for (; i + 2 <= n; i += 2) _mm_storeu_pd(d + i, _mm_loadu_pd(s + i));
    #else
    static void fastbn_stream_line_f32(float* dst, const float* src) {
        for (int i = 0; i < 16; i++) dst[i] = src[i];
    }
    static void fastbn_stream_line_f64(double* dst, const double* src) {
        for (int i = 0; i < 8; i++) dst[i] = src[i];
    }
    static void fastbn_stream_fence(void) {}
    #define FASTBN_COPY_VECTORS \
        for (; i + 4 <= n; i += 4) { d[i] = s[i]; d[i + 1] = s[i + 1]; \
                                     d[i + 2] = s[i + 2]; d[i + 3] = s[i + 3]; }
    #define FASTBN_COPY_VECTORS_F64 FASTBN_COPY_VECTORS
    #endif
    /* Copies of short runs (into a piece of the sums) in vector moves and a switch: a
       plain copy loop is turned into a library call by the compiler, and the call costs
       more than copying a run of 49 values. */
    static void fastbn_copy_f32(float* d, const float* s, Py_ssize_t n) {
        Py_ssize_t i = 0;
        FASTBN_COPY_VECTORS
        switch (n - i) {
            case 3: d[i + 2] = s[i + 2]; /* fall through */
            case 2: d[i + 1] = s[i + 1]; /* fall through */
            case 1: d[i] = s[i];
        }
    }
    static void fastbn_copy_f64(double* d, const double* s, Py_ssize_t n) {
        Py_ssize_t i = 0;
        FASTBN_COPY_VECTORS_F64
        switch (n - i) {
            case 3: d[i + 2] = s[i + 2]; /* fall through */
            case 2: d[i + 1] = s[i + 1]; /* fall through */
            case 1: d[i] = s[i];
        }
    }
    """
    void fastbn_stream_line_f32(float* dst, const float* src) noexcept nogil
    void fastbn_stream_line_f64(double* dst, const double* src) noexcept nogil
    void fastbn_stream_fence() noexcept nogil
    void fastbn_copy_f32(float* d, const float* s, Py_ssize_t n) noexcept nogil
    void fastbn_copy_f64(double* d, const double* s, Py_ssize_t n) noexcept nogil

cdef extern from *:
    """
    /* float16 <-> float32 with the F16C instructions (round to nearest even, as
       NumPy's casts); builds without them have none and say so. */
    #if defined(__F16C__)
    #include <immintrin.h>
    #include <math.h>
    static int fastbn_have_f16c(void) { return 1; }
    static float fastbn_half_to_float(unsigned short h) { return _cvtsh_ss(h); }
    static void fastbn_halves_to_floats(const unsigned short* s, float* d, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
        for (; i < n; i++)
            d[i] = _cvtsh_ss(s[i]);
    }
    static void fastbn_floats_to_halves(const float* s, unsigned short* d, Py_ssize_t n) {
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(d + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++)
            d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
    }
    /* y = (x - m) * k + b, then max(y, 0) if relu, on float16 x and y, in float32 with a
       fused multiply-add (as the float32 kernels compile it), rounded once: n values
       with per-value parameters (rows), or with one set for all (runs, m_step 0). */
    static void fastbn_affine_halves(const unsigned short* x, unsigned short* y, Py_ssize_t n,
                                     const float* m, const float* k, const float* b,
                                     int per_value, int relu) {
        Py_ssize_t j = 0, s = per_value ? 1 : 0;
        __m256 zero = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + j)));
            __m256 mv = per_value ? _mm256_loadu_ps(m + j) : _mm256_set1_ps(m[0]);
            __m256 kv = per_value ? _mm256_loadu_ps(k + j) : _mm256_set1_ps(k[0]);
            __m256 bv = per_value ? _mm256_loadu_ps(b + j) : _mm256_set1_ps(b[0]);
            v = _mm256_fmadd_ps(_mm256_sub_ps(v, mv), kv, bv);
            /* max(v, 0) gives 0 for NaN and for -0, as `v if v > 0 else 0` does. */
            if (relu) v = _mm256_max_ps(v, zero);
            _mm_storeu_si128((__m128i*)(y + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        }
        for (; j < n; j++) {
            float v = fmaf(_cvtsh_ss(x[j]) - m[j * s], k[j * s], b[j * s]);
            if (relu && !(v > 0)) v = 0;
            y[j] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
        }
    }
    /* dx = a * dy + (k * (x - m) + b) on float16 x, dy and dx, in float32 with the fused
       multiply-adds the float32 kernels compile it to, rounded once; parameters as in
       fastbn_affine_halves. */
    static void fastbn_grad_halves(const unsigned short* x, const unsigned short* dy,
                                   unsigned short* dx, Py_ssize_t n, const float* m,
                                   const float* k, const float* b, const float* a,
                                   int per_value) {
        Py_ssize_t j = 0, s = per_value ? 1 : 0;
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(x + j)));
            __m256 g = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(dy + j)));
            __m256 mv = per_value ? _mm256_loadu_ps(m + j) : _mm256_set1_ps(m[0]);
            __m256 kv = per_value ? _mm256_loadu_ps(k + j) : _mm256_set1_ps(k[0]);
            __m256 bv = per_value ? _mm256_loadu_ps(b + j) : _mm256_set1_ps(b[0]);
            __m256 av = per_value ? _mm256_loadu_ps(a + j) : _mm256_set1_ps(a[0]);
            __m256 t = _mm256_fmadd_ps(kv, _mm256_sub_ps(v, mv), bv);
            t = _mm256_fmadd_ps(av, g, t);
            _mm_storeu_si128((__m128i*)(dx + j), _mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT));
        }
        for (; j < n; j++) {
            float t = fmaf(k[j * s], _cvtsh_ss(x[j]) - m[j * s], b[j * s]);
            t = fmaf(a[j * s], _cvtsh_ss(dy[j]), t);
            dx[j] = _cvtss_sh(t, _MM_FROUND_TO_NEAREST_INT);
        }
    }
    #else
    static int fastbn_have_f16c(void) { return 0; }
    static float fastbn_half_to_float(unsigned short h) { return 0; }
    static void fastbn_halves_to_floats(const unsigned short* s, float* d, Py_ssize_t n) {}
    static void fastbn_floats_to_halves(const float* s, unsigned short* d, Py_ssize_t n) {}
    static void fastbn_affine_halves(const unsigned short* x, unsigned short* y, Py_ssize_t n,
                                     const float* m, const float* k, const float* b,
                                     int per_value, int relu) {}
    static void fastbn_grad_halves(const unsigned short* x, const unsigned short* dy,
                                   unsigned short* dx, Py_ssize_t n, const float* m,
                                   const float* k, const float* b, const float* a,
                                   int per_value) {}
    #endif
    """
    int fastbn_have_f16c() noexcept nogil
    float fastbn_half_to_float(unsigned short h) noexcept nogil
    void fastbn_halves_to_floats(const unsigned short* s, float* d, Py_ssize_t n) noexcept nogil
    void fastbn_floats_to_halves(const float* s, unsigned short* d, Py_ssize_t n) noexcept nogil
    void fastbn_affine_halves(const unsigned short* x, unsigned short* y, Py_ssize_t n,
                              const float* m, const float* k, const float* b, int per_value,
                              int relu) noexcept nogil
    void fastbn_grad_halves(const unsigned short* x, const unsigned short* dy,
                            unsigned short* dx, Py_ssize_t n, const float* m, const float* k,
                            const float* b, const float* a, int per_value) noexcept nogil

cdef extern from *:
    """
    /* The gradients through fastbn's activations from their outputs y, as TF's
       ReluGrad, Relu6Grad, SigmoidGrad, TanhGrad and EluGrad compute them; kinds in the
       order of fastbn.backends.base.ACTIVATIONS, with TF's bits: tanh's 1 - y * y is
       not contracted into one rounding (the only multiply-add among them). */
    #if defined(__GNUC__) && !defined(__clang__)
    #define FASTBN_TF_ROUNDING __attribute__((optimize("fp-contract=off")))
    /* GCC turns a choice between floating-point values into a vector blend only where
       it may assume no floating-point trap (clang does by default); no kernel reads the
       exception flags. */
    #define FASTBN_BLENDS __attribute__((optimize("no-trapping-math")))
    #else
    #define FASTBN_TF_ROUNDING
    #define FASTBN_BLENDS
    #endif
    /* Products where TF multiplies: dy * 0 is NaN for an infinite or NaN dy. */
    #define FASTBN_ACTIVATION_GRAD(T, NAME)                                              \
    static FASTBN_TF_ROUNDING void NAME##_tanh(const T* dy, const T* y, T* out,          \
                                               Py_ssize_t n) {                          \
        Py_ssize_t i;                                                                  \
        const T one = 1;                                                               \
        for (i = 0; i < n; i++) out[i] = dy[i] * (one - y[i] * y[i]);                  \
    }                                                                                  \
    static FASTBN_BLENDS void NAME(const T* dy, const T* y, T* out, Py_ssize_t n,       \
                                  int kind) {                                          \
        Py_ssize_t i;                                                                  \
        const T one = 1, zero = 0, six = 6;                                            \
        T v, t;                                                                        \
        switch (kind) {                                                                \
        case 0:                                                                        \
            for (i = 0; i < n; i++) out[i] = dy[i] * (y[i] > zero ? one : zero);       \
            break;                                                                     \
        case 1:                                                                        \
            for (i = 0; i < n; i++)                                                    \
                out[i] = dy[i] * ((y[i] > zero) & (y[i] < six) ? one : zero);          \
            break;                                                                     \
        case 2:                                                                        \
            for (i = 0; i < n; i++) out[i] = dy[i] * (y[i] * (one - y[i]));            \
            break;                                                                     \
        case 3:                                                                        \
            NAME##_tanh(dy, y, out, n);                                                \
            break;                                                                     \
        default:                                                                       \
            for (i = 0; i < n; i++) {                                                  \
                v = y[i];                                                              \
                t = v + one;                                                           \
                out[i] = dy[i] * (v < zero ? t : one);                                 \
            }                                                                          \
        }                                                                              \
    }
    FASTBN_ACTIVATION_GRAD(float, fastbn_activation_grad_f32)
    FASTBN_ACTIVATION_GRAD(double, fastbn_activation_grad_f64)
    """
    void fastbn_activation_grad_f32(const float* dy, const float* y, float* out, Py_ssize_t n,
                                    int kind) noexcept nogil
    void fastbn_activation_grad_f64(const double* dy, const double* y, double* out,
                                    Py_ssize_t n, int kind) noexcept nogil

cdef extern from *:
    """
    /* fastbn's activations themselves, elementwise in the data type, in vector loops:
       exp and expm1 are needed only at arguments <= 0 (e^-|x| for sigmoid, e^-2|x| - 1
       for tanh, e^x - 1 below 0 for elu), where they cannot overflow.  Within 2.5 ulp
       of the exact values (TF's own are Eigen's approximations); NaN passes;
       elu(-0.0) and tanh(-0.0) are -0.0.  Kinds in the order of
       fastbn.backends.base.ACTIVATIONS. */
    #include <stdint.h>
    #include <string.h>
    /* expm1(r) - r for |r| <= ln2 / 2: the Taylor series, cut where the next term is
       below a hundredth of the type's rounding. */
    static inline FASTBN_BLENDS float fastbn_expm1_tail_f32(float r) {
        float p = 1.0f / 40320;
        p = p * r + 1.0f / 5040; p = p * r + 1.0f / 720; p = p * r + 1.0f / 120;
        p = p * r + 1.0f / 24; p = p * r + 1.0f / 6; p = p * r + 0.5f;
        return r * r * p;
    }
    static inline FASTBN_BLENDS double fastbn_expm1_tail_f64(double r) {
        double p = 1.0 / 87178291200.0;
        p = p * r + 1.0 / 6227020800.0;
        p = p * r + 1.0 / 479001600.0; p = p * r + 1.0 / 39916800.0;
        p = p * r + 1.0 / 3628800.0; p = p * r + 1.0 / 362880.0; p = p * r + 1.0 / 40320.0;
        p = p * r + 1.0 / 5040.0; p = p * r + 1.0 / 720.0; p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0; p = p * r + 1.0 / 6.0; p = p * r + 0.5;
        return r * r * p;
    }
    /* The activations' loops are compute-bound: the avx2 build also has them for
       AVX-512, chosen at run time where the CPU has it (fastbn_have_wide()). */
    #if defined(__AVX2__) && (defined(__GNUC__) || defined(__clang__))
    #define FASTBN_WIDE __attribute__((target("avx512f")))
    static int fastbn_have_wide(void) { return __builtin_cpu_supports("avx512f"); }
    #else
    #define FASTBN_WIDE
    static int fastbn_have_wide(void) { return 0; }
    #endif
    /* The loops of NAME, compiled as FN with the target attributes ATTR. */
    #define FASTBN_ACTIVATION_LOOPS(T, NAME, FN, ATTR)                                 \
    static FASTBN_BLENDS ATTR void FN(const T* x, T* y, Py_ssize_t n, int kind,        \
                                      T relu_zero) {                                   \
        Py_ssize_t i;                                                                  \
        const T zero = 0, one = 1, two = 2, six = 6;                                   \
        T v, e;                                                                        \
        switch (kind) {                                                                \
        case 0:                                                                        \
            for (i = 0; i < n; i++) { v = x[i]; y[i] = (v < zero ? zero : v) + relu_zero; }\
            break;                                                                     \
        case 1:                                                                        \
            for (i = 0; i < n; i++) {                                                  \
                v = x[i];                                                              \
                v = (v < zero ? zero : v) + relu_zero;                                 \
                y[i] = v > six ? six : v;                                              \
            }                                                                          \
            break;                                                                     \
        case 2: /* 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below */                 \
            for (i = 0; i < n; i++) {                                                  \
                v = x[i];                                                              \
                e = NAME##_exp(v < zero ? v : -v);                                     \
                y[i] = (v >= zero ? one : e) / (one + e);                              \
            }                                                                          \
            break;                                                                     \
        case 3: /* tanh|x| = -(e^-2|x| - 1) / (e^-2|x| + 1), with x's sign */           \
            for (i = 0; i < n; i++) {                                                  \
                v = x[i];                                                              \
                e = NAME##_expm1(two * (v < zero ? v : -v));                           \
                y[i] = __builtin_copysign(-e / (e + two), v);                          \
            }                                                                          \
            break;                                                                     \
        default:                                                                       \
            for (i = 0; i < n; i++) {                                                  \
                v = x[i];                                                              \
                e = NAME##_expm1(v < zero ? v : zero);                                 \
                y[i] = v < zero ? e : v;                                               \
            }                                                                          \
        }                                                                              \
    }

    /* Integers by the magic-number rounding (x + 1.5 * 2^mantissa_bits keeps round(x)
       in the low bits), so that every step vectorises on SSE2 as on AVX2.  Every helper
       carries FASTBN_BLENDS: GCC inlines only functions of the same options. */
    #define FASTBN_ACTIVATION(T, U, NAME, TAIL, SHIFT, BIAS, MAGIC, LOG2E, LN2_HI, LN2_LO, \
                              EXP_LOW, EXPM1_LOW)                                      \
    /* 2^k from t = k + MAGIC. */                                                      \
    static inline FASTBN_BLENDS T NAME##_pow2(T t) {                                   \
        const T magic = MAGIC;                                                         \
        U bits, m;                                                                     \
        T s;                                                                           \
        memcpy(&bits, &t, sizeof bits);                                                \
        memcpy(&m, &magic, sizeof m);                                                  \
        bits = (bits - m + BIAS) << SHIFT;                                             \
        memcpy(&s, &bits, sizeof s);                                                   \
        return s;                                                                      \
    }                                                                                  \
    /* e^x = 2^k (1 + the result), t = k + MAGIC, for x in [EXP_LOW, 0] or NaN:          \
       x = k ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, the first exact times any k). */ \
    static inline FASTBN_BLENDS T NAME##_reduce(T x, T* t) {                           \
        const T magic = MAGIC;                                                         \
        T k;                                                                           \
        *t = x * (T)LOG2E + magic;                                                     \
        k = *t - magic;                                                                \
        T r = (x - k * (T)LN2_HI) - k * (T)LN2_LO;                                     \
        return r + TAIL(r);                                                            \
    }                                                                                  \
    /* 2^k in two normal factors, so that a subnormal e^x is rounded once, by the last   \
       product. */                                                                     \
    static inline FASTBN_BLENDS T NAME##_exp(T x) {                                    \
        const T magic = MAGIC;                                                         \
        T t, k, t1, s1, s2, em;                                                        \
        x = x < (T)EXP_LOW ? (T)EXP_LOW : x;                                           \
        em = NAME##_reduce(x, &t);                                                     \
        k = t - magic;                                                                 \
        t1 = k * (T)0.5 + magic;                                                       \
        s1 = NAME##_pow2(t1);                                                          \
        s2 = NAME##_pow2((k - (t1 - magic)) + magic);                                  \
        return (s1 * em + s1) * s2;                                                    \
    }                                                                                  \
    /* Below EXPM1_LOW, e^x - 1 rounds to -1; above it 2^k is normal, and s - 1 is      \
       exact wherever it matters. */                                                    \
    static inline FASTBN_BLENDS T NAME##_expm1(T x) {                                  \
        T t, s, em;                                                                    \
        x = x < (T)EXPM1_LOW ? (T)EXPM1_LOW : x;                                       \
        em = NAME##_reduce(x, &t);                                                     \
        s = NAME##_pow2(t);                                                            \
        return s * em + (s - 1);                                                       \
    }                                                                                  \
    /* relu_zero is added to relu's and relu6's results: +0.0 makes relu(-0.0) +0.0    \
       (TF's float32 and float64), -0.0 leaves every value as it is (TF's float16).      \
       `wide`: the loops compiled for AVX-512 (where fastbn_have_wide()). */             \
    FASTBN_ACTIVATION_LOOPS(T, NAME, NAME##_narrow, )                                  \
    FASTBN_ACTIVATION_LOOPS(T, NAME, NAME##_wide, FASTBN_WIDE)                         \
    static void NAME(const T* x, T* y, Py_ssize_t n, int kind, T relu_zero, int wide) {\
        if (wide)                                                                      \
            NAME##_wide(x, y, n, kind, relu_zero);                                     \
        else                                                                           \
            NAME##_narrow(x, y, n, kind, relu_zero);                                   \
    }
    FASTBN_ACTIVATION(float, uint32_t, fastbn_activation_f32, fastbn_expm1_tail_f32, 23,
                      127u, 0x1.8p23f, 0x1.715476p+0f, 0x1.62e4p-1f, 0x1.7f7d1cp-20f,
                      -104.0f, -30.0f)
    FASTBN_ACTIVATION(double, uint64_t, fastbn_activation_f64, fastbn_expm1_tail_f64, 52,
                      1023u, 0x1.8p52, 0x1.71547652b82fep+0, 0x1.62e42fefa38p-1,
                      0x1.ef35793c7673p-45, -746.0, -50.0)
    """
    int fastbn_have_wide() noexcept nogil
    void fastbn_activation_f32(const float* x, float* y, Py_ssize_t n, int kind,
                               float relu_zero, int wide) noexcept nogil
    void fastbn_activation_f64(const double* x, double* y, Py_ssize_t n, int kind,
                               double relu_zero, int wide) noexcept nogil

ctypedef fused floating:
    float
    double

# Elements per statistics block: small enough to stay in L2 between its two passes.
DEF BLOCK = 32768
# Inner sums in the data type run over this many rows (rows layout) or steps of the
# lanes (runs layout, see _run_sums) before they are flushed into float64.
DEF FLUSH = 64
# The sums take data about this many values at a time into a buffer that stays in L1:
# float16 data widened to float32 (rows layout: whole rows, see _piece_rows), and in
# the runs layout whole runs gathered together, so that short ones share lanes and
# flushes (a longer run: whole steps of the lanes at a time, see _runs_pieces).
DEF SUMS_PIECE = 2048
# The runs layout's sums take what is left of a run after its whole steps of 32 (16)
# lanes this many values at a time.
DEF GROUP = 8
# Below this many elements the kernels stay on one thread: forking costs more.
DEF SERIAL_BELOW = 65536
# Channels per block in the rows layout.
DEF CHANNEL_TILE = 256
# A thread's channels of a row tile go through the gradient sums up to this many at a time
# (float32 or float64; float16 keeps CHANNEL_TILE), their sums for one flush side by side
# in a scratch block on the heap: rows are then read in long stretches instead of 1 KB
# pieces 16 KB apart (on a 2-core AMD EPYC, kernel_ab: 2-D 256x4096 backward 0-13% faster
# in six runs, median 6%; NHWC 32x7x7x512 5%; float64 2-D 9%; same bits, as each channel's
# sums are its own).
DEF SUMS_ROW = 4096
# Elementwise passes over rows wider than this many channels go tile by tile,
# NORM_ROWS rows at a time, keeping each tile's parameters in L1.
DEF NORM_TILE = 1024
DEF NORM_ROWS = 8
# A streamed output (non-temporal stores, chosen by the caller for outputs larger
# than the cache) is stored in whole cache lines of LINE_BYTES, computed up to
# PIECE_LINES lines at a time into a buffer on the stack: small enough to alternate
# reading and writing memory finely, large enough for the loops to vectorise.
DEF LINE_BYTES = 64
# Plain (cached) stores start at a multiple of this, where the ends allow: a vector
# that straddles two cache lines costs two accesses, and NumPy's large arrays start
# 16 bytes past a line, which would straddle every other vector of 32 bytes.
DEF VECTOR_BYTES = 32
# Runs of fewer bytes do not align their plain stores (_affine_run_out).
DEF SHORT_RUN_BYTES = 256
DEF LINE_FLOATS = LINE_BYTES // 4
DEF PIECE_LINES = 4
# Rows of at most NORM_TILE channels are cut into stretches of this many elements,
# regardless of row boundaries: a loop then runs over up to WRAP elements at a time
# instead of one short row (64 channels leave a vector loop little to do per call),
# and a streamed stretch stores only its two ends plainly (a row of 64 float32
# misaligned by 16 bytes would otherwise leave one line in four to plain stores).
DEF STRETCH = 8192
DEF WRAP = 1024
# Channel by channel (runs layout): when a channel's input is at most this many bytes,
# a thread reduces it and then writes its output while it is still in L2, so the data
# comes from memory once instead of twice.  Same blocks, same merge order, same bits.
DEF CHANNELWISE_BYTES = 1048576
# ... and, in the backward and for float16 training, runs of at least this many bytes
# (of x; of x and dy together in the backward).
DEF CHANNELWISE_RUN_BYTES = 512
# A block whose shift is more than sqrt(this) standard deviations from its mean
# is reduced again, centred on its mean.
DEF ILL_CONDITIONED = 64.0


# Exposed so that the backend skips thread bookkeeping where the kernels would not use it.
serial_below = SERIAL_BELOW


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(fastbn_have_openmp())


def omp_max_threads():
    """OpenMP's current thread limit (OMP_NUM_THREADS, threadpoolctl)."""
    return fastbn_omp_max_threads()


cdef inline Py_ssize_t _share_end(Py_ssize_t n_items, int after) noexcept nogil:
    """Inside a parallel block, where the calling thread's contiguous share of n_items
    items starts (after=0) or ends (after=1).  (Assigned in the block, not through a
    pointer, the bounds stay private to each thread.)"""
    return n_items * (fastbn_thread_num() + after) // fastbn_team_size()


cdef inline int _threads(Py_ssize_t size, int n_threads) noexcept nogil:
    if size < SERIAL_BELOW or n_threads < 1:
        return 1
    return n_threads


# ---------------------------------------------------------------------------
# block geometry (a function of the shape only)

cdef struct Geometry:
    Py_ssize_t N, C, M
    # rows layout: row tiles x channel tiles
    Py_ssize_t row_tile, n_row_tiles, channel_tile, n_channel_tiles
    # runs layout: per channel, groups of whole runs, or chunks of one run
    Py_ssize_t runs_per_block, chunk, chunks_per_run, n_groups
    Py_ssize_t blocks_per_channel


cdef Geometry _geometry(Py_ssize_t N, Py_ssize_t C, Py_ssize_t M) noexcept nogil:
    cdef Geometry g
    memset(&g, 0, sizeof(Geometry))
    g.N = N
    g.C = C
    g.M = M
    if M == 1:
        # Tiles as even as the limits allow (channel tiles in whole vectors of 16), so
        # that the threads' static shares of the blocks hold about the same data.
        g.n_channel_tiles = (C + CHANNEL_TILE - 1) // CHANNEL_TILE
        g.channel_tile = (C + g.n_channel_tiles - 1) // g.n_channel_tiles if C > 0 else 0
        if g.n_channel_tiles > 1:
            g.channel_tile = (g.channel_tile + 15) // 16 * 16
            g.n_channel_tiles = (C + g.channel_tile - 1) // g.channel_tile
        # (At most CHANNEL_TILE channels: BLOCK // channel_tile is at least 128 rows.)
        g.row_tile = BLOCK // g.channel_tile if g.channel_tile > 0 else 1
        g.n_row_tiles = (N + g.row_tile - 1) // g.row_tile
        if g.n_row_tiles > 0:
            g.row_tile = (N + g.n_row_tiles - 1) // g.n_row_tiles
        g.blocks_per_channel = g.n_row_tiles
    else:
        if M >= BLOCK:
            g.runs_per_block = 1
            g.chunk = BLOCK
            g.chunks_per_run = (M + BLOCK - 1) // BLOCK
        elif M > 0:
            g.runs_per_block = BLOCK // M
            g.chunk = M
            g.chunks_per_run = 1
        else:
            # Empty runs: no blocks.
            g.runs_per_block = 1
        g.n_groups = (N + g.runs_per_block - 1) // g.runs_per_block
        g.blocks_per_channel = g.n_groups * g.chunks_per_run
    return g


# ---------------------------------------------------------------------------
# where each statistics block lies (a function of the shape only)

cdef struct Block:
    # rows layout: rows r0..r1 of channels c0..c0 + w, row tile rt
    Py_ssize_t rt, c0, w, r0, r1
    # runs layout: block blk of channel c, its runs n0..n1 from m0, length values each
    Py_ssize_t c, blk, n0, n1, m0, length
    # where its per-channel results go (slot + j for its j-th channel)
    Py_ssize_t slot


cdef inline Block _runs_of(Geometry* g, Py_ssize_t c, Py_ssize_t blk) noexcept nogil:
    """Where block blk of channel c lies in the runs layout (a group of runs, or a chunk
    of one run)."""
    cdef Block k
    memset(&k, 0, sizeof(Block))
    k.c = c
    k.blk = blk
    k.n0 = (blk // g.chunks_per_run) * g.runs_per_block
    k.n1 = k.n0 + g.runs_per_block if k.n0 + g.runs_per_block < g.N else g.N
    k.m0 = (blk % g.chunks_per_run) * g.chunk
    k.length = g.M - k.m0 if g.M - k.m0 < g.chunk else g.chunk
    k.slot = blk * g.C + c
    return k


cdef inline Py_ssize_t _n_blocks(Geometry* g) noexcept nogil:
    """How many statistics blocks there are (see _block)."""
    if g.M == 1:
        return g.n_row_tiles * g.n_channel_tiles
    return g.C * g.blocks_per_channel


cdef inline Block _block(Geometry* g, Py_ssize_t b) noexcept nogil:
    """Where statistics block b lies: a row tile x channel tile (rows layout), or one of a
    channel's blocks (runs layout)."""
    cdef Block k
    if g.M != 1:
        return _runs_of(g, b // g.blocks_per_channel, b % g.blocks_per_channel)
    memset(&k, 0, sizeof(Block))
    k.rt = b // g.n_channel_tiles
    k.c0 = (b % g.n_channel_tiles) * g.channel_tile
    k.w = g.C - k.c0 if g.C - k.c0 < g.channel_tile else g.channel_tile
    k.r0 = k.rt * g.row_tile
    k.r1 = k.r0 + g.row_tile if k.r0 + g.row_tile < g.N else g.N
    k.slot = k.rt * g.C + k.c0
    return k


# ---------------------------------------------------------------------------
# per-block statistics, rows layout (x[n*C + c])

cdef bint _shifted_moments(double n, double shift, double s1, double s2, double* mean,
                           double* m2) noexcept nogil:
    """Mean and M2 from sums shifted by `shift`; False when the shift cost too many digits."""
    cdef double m = s1 / n
    cdef double var = s2 / n - m * m
    mean[0] = shift + m
    m2[0] = s2 - s1 * m
    if m2[0] < 0.0:
        m2[0] = 0.0
    return not (m * m > ILL_CONDITIONED * var)


cdef inline void _rows_sums(const floating* rows, Py_ssize_t stride, Py_ssize_t n,
                            const floating* first, Py_ssize_t w, floating* s1,
                            floating* s2) noexcept nogil:
    """Adds sum(d) and sum(d*d), d = row - first, of n rows `stride` apart into s1[j],
    s2[j] (local arrays of the caller, inlined: the compiler then knows they alias
    nothing, and vectorises)."""
    cdef Py_ssize_t r = 0, j
    cdef const floating* row
    cdef const floating* row1
    cdef const floating* row2
    cdef const floating* row3
    cdef floating v, v1, v2, v3
    # Four rows per visit of the accumulators: a quarter of their loads and stores.
    while r + 4 <= n:
        row = rows + r * stride
        row1 = row + stride
        row2 = row1 + stride
        row3 = row2 + stride
        for j in range(w):
            v = row[j] - first[j]
            v1 = row1[j] - first[j]
            v2 = row2[j] - first[j]
            v3 = row3[j] - first[j]
            s1[j] += (v + v1) + (v2 + v3)
            s2[j] += (v * v + v1 * v1) + (v2 * v2 + v3 * v3)
        r += 4
    while r < n:
        row = rows + r * stride
        for j in range(w):
            v = row[j] - first[j]
            s1[j] += v
            s2[j] += v * v
        r += 1


cdef inline bint _rows_moments(const floating* first, const double* d1, const double* d2,
                               double n, Py_ssize_t w, double* mean,
                               double* m2) noexcept nogil:
    """_shifted_moments for all channels of a rows block at once, branch-free so that it
    vectorises; True where a shift cost too many digits."""
    cdef Py_ssize_t j
    cdef double inv_n = 1.0 / n, m, var
    cdef int bad = 0
    for j in range(w):
        m = d1[j] * inv_n
        var = d2[j] * inv_n - m * m
        mean[j] = first[j] + m
        m2[j] = max(d2[j] - d1[j] * m, 0.0)
        bad += m * m > ILL_CONDITIONED * var
    return bad != 0


cdef void _rows_block(const floating* x, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1,
                      Py_ssize_t c0, Py_ssize_t w, double* d1, double* d2, double* mean,
                      double* m2) noexcept nogil:
    """Mean and M2 of rows r0..r1, channels c0..c0+w (w <= CHANNEL_TILE), into mean[c],
    m2[c].  The inner sums live in local arrays, which the compiler knows alias nothing:
    through pointers it may not vectorise the loop at all."""
    cdef Py_ssize_t r, j, r_end
    cdef const floating* first = x + r0 * C + c0
    cdef floating s1[CHANNEL_TILE]
    cdef floating s2[CHANNEL_TILE]
    for j in range(w):
        d1[j] = 0.0
        d2[j] = 0.0
    r = r0
    while r < r1:
        r_end = r + FLUSH if r + FLUSH < r1 else r1
        for j in range(w):
            s1[j] = 0
            s2[j] = 0
        _rows_sums(x + r * C + c0, C, r_end - r, first, w, s1, s2)
        r = r_end
        for j in range(w):
            d1[j] += s1[j]
            d2[j] += s2[j]
    if _rows_moments(first, d1, d2, <double>(r1 - r0), w, mean, m2):
        _rows_block_two_pass(x, C, r0, r1, c0, w, d1, d2, mean, m2)


cdef inline Py_ssize_t _piece_rows(Py_ssize_t w) noexcept nogil:
    """Rows of w float16 channels widened at a time: at most SUMS_PIECE values (w is at
    most CHANNEL_TILE: at least 8 rows), a whole number of _rows_sums' and
    _grad_rows_sums' visits (4 and 2 rows), so that they add in the same order."""
    cdef Py_ssize_t rows = (SUMS_PIECE // w) // 4 * 4
    return rows if rows >= 4 else 4


cdef void _rows_block_halves(const unsigned short* x, Py_ssize_t C, Py_ssize_t r0,
                             Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w, double* d1,
                             double* d2, double* mean, double* m2) noexcept nogil:
    """_rows_block of float16 data (F16C builds), its float32 arithmetic on the same
    values (same bits): each FLUSH chunk widened a piece of rows at a time into a buffer
    that stays in L1."""
    cdef Py_ssize_t r, j, r_end, p_end, i, piece = _piece_rows(w)
    cdef float first[CHANNEL_TILE]
    cdef float buf[SUMS_PIECE]
    cdef float s1[CHANNEL_TILE]
    cdef float s2[CHANNEL_TILE]
    fastbn_halves_to_floats(x + r0 * C + c0, first, w)
    for j in range(w):
        d1[j] = 0.0
        d2[j] = 0.0
    r = r0
    while r < r1:
        r_end = r + FLUSH if r + FLUSH < r1 else r1
        for j in range(w):
            s1[j] = 0
            s2[j] = 0
        while r < r_end:
            p_end = r + piece if r + piece < r_end else r_end
            for i in range(r, p_end):
                fastbn_halves_to_floats(x + i * C + c0, buf + (i - r) * w, w)
            _rows_sums(buf, w, p_end - r, first, w, s1, s2)
            r = p_end
        for j in range(w):
            d1[j] += s1[j]
            d2[j] += s2[j]
    if _rows_moments(first, d1, d2, <double>(r1 - r0), w, mean, m2):
        _rows_two_pass_halves(x, C, r0, r1, c0, w, d1, d2, mean, m2)


cdef void _rows_two_pass_halves(const unsigned short* x, Py_ssize_t C, Py_ssize_t r0,
                                Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t w, double* d1,
                                double* d2, double* mean, double* m2) noexcept nogil:
    """_rows_block_two_pass of float16 data: the block widened whole (it is reduced
    twice), in a frame of its own that only an ill-conditioned block enters."""
    cdef float buf[BLOCK]
    cdef Py_ssize_t i
    for i in range(r0, r1):
        fastbn_halves_to_floats(x + i * C + c0, buf + (i - r0) * w, w)
    _rows_block_two_pass(buf, w, 0, r1 - r0, 0, w, d1, d2, mean, m2)


cdef void _rows_block_two_pass(const floating* x, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1,
                               Py_ssize_t c0, Py_ssize_t w, double* d1, double* d2,
                               double* mean, double* m2) noexcept nogil:
    """`_rows_block` centred on the block's mean: exact whatever the data's offset."""
    cdef Py_ssize_t r, j, r_end
    cdef const floating* row
    cdef const floating* first = x + r0 * C + c0
    cdef double n = <double>(r1 - r0)
    cdef floating v
    cdef floating f1[CHANNEL_TILE]
    cdef floating s1[CHANNEL_TILE]
    cdef floating s2[CHANNEL_TILE]
    # Pass 1: sum of x - (first row), for a centre.
    for j in range(w):
        d1[j] = 0.0
    r = r0
    while r < r1:
        r_end = r + FLUSH if r + FLUSH < r1 else r1
        for j in range(w):
            f1[j] = 0
        while r < r_end:
            row = x + r * C + c0
            for j in range(w):
                f1[j] += row[j] - first[j]
            r += 1
        for j in range(w):
            d1[j] += f1[j]
    for j in range(w):
        mean[j] = first[j] + d1[j] / n
        d1[j] = 0.0
        d2[j] = 0.0
        # The centre as the data type sees it: f1 holds it during pass 2.
        f1[j] = <floating>mean[j]
    # Pass 2: sum(d) and sum(d*d) with d = x - centre; M2 = sum(d*d) - sum(d)^2 / n.
    r = r0
    while r < r1:
        r_end = r + FLUSH if r + FLUSH < r1 else r1
        for j in range(w):
            s1[j] = 0
            s2[j] = 0
        while r < r_end:
            row = x + r * C + c0
            for j in range(w):
                v = row[j] - f1[j]
                s1[j] += v
                s2[j] += v * v
            r += 1
        for j in range(w):
            d1[j] += s1[j]
            d2[j] += s2[j]
    for j in range(w):
        mean[j] = <double>f1[j] + d1[j] / n
        m2[j] = d2[j] - d1[j] * d1[j] / n
        if m2[j] < 0.0:
            m2[j] = 0.0


cdef void _rows_block_weighted(const floating* x, Py_ssize_t C, Py_ssize_t r0, Py_ssize_t r1,
                               Py_ssize_t c0, Py_ssize_t w, const floating* wt,
                               Py_ssize_t ws_n, Py_ssize_t ws_c,
                               double* d0, double* d1, double* d2,
                               double* count, double* mean, double* m2) noexcept nogil:
    """Weighted mean and M2 of a rows block (weights wt[n*ws_n + c*ws_c] >= 0)."""
    cdef Py_ssize_t r, j
    cdef const floating* row
    cdef const floating* wrow
    cdef const floating* first = x + r0 * C + c0
    cdef double v, a
    for j in range(w):
        d0[j] = 0.0
        d1[j] = 0.0
    for r in range(r0, r1):
        row = x + r * C + c0
        wrow = wt + r * ws_n + c0 * ws_c
        for j in range(w):
            a = wrow[j * ws_c]
            d0[j] += a
            d1[j] += a * (<double>row[j] - <double>first[j])
    for j in range(w):
        count[j] = d0[j]
        mean[j] = first[j] + (d1[j] / d0[j] if d0[j] != 0.0 else 0.0)
        d1[j] = 0.0
        d2[j] = 0.0
    for r in range(r0, r1):
        row = x + r * C + c0
        wrow = wt + r * ws_n + c0 * ws_c
        for j in range(w):
            a = wrow[j * ws_c]
            v = <double>row[j] - mean[j]
            d1[j] += a * v
            d2[j] += a * v * v
    for j in range(w):
        if d0[j] != 0.0:
            mean[j] = mean[j] + d1[j] / d0[j]
            m2[j] = d2[j] - d1[j] * d1[j] / d0[j]
            if m2[j] < 0.0:
                m2[j] = 0.0
        else:
            mean[j] = 0.0
            m2[j] = 0.0


# ---------------------------------------------------------------------------
# per-block statistics, runs layout (x[(n*C + c)*M + m])

cdef inline double _lanes_sum(floating* acc) noexcept nogil:
    """Pairwise sum of the 32 float (16 double) accumulator lanes, in float64: halves
    of constant widths, which the compiler keeps in registers."""
    cdef double part[32]
    cdef int i, lanes = 32 if floating is float else 16
    for i in range(lanes):
        part[i] = acc[i]
    if lanes == 32:
        for i in range(16):
            part[i] = part[i] + part[i + 16]
    for i in range(8):
        part[i] = part[i] + part[i + 8]
    for i in range(4):
        part[i] = part[i] + part[i + 4]
    for i in range(2):
        part[i] = part[i] + part[i + 2]
    return part[0] + part[1]


cdef inline void _run_sums(const floating* p, Py_ssize_t length, floating centre,
                           double* sum1, double* sum2) noexcept nogil:
    """Adds sum(p - centre) and sum((p - centre)**2) over a run.

    32 float lanes (16 double) of independent accumulators: enough to hide the
    latency of the additions.  What is left of the run after its whole steps goes
    into the first lanes GROUP values at a time, in the same flush where there is
    room (runs of 49 or 196 values, NCHW 7x7 and 14x14, are mostly tail); the last
    few values one by one.
    """
    cdef floating a1[32]
    cdef floating a2[32]
    cdef int lanes = 32 if floating is float else 16
    cdef Py_ssize_t i = 0, j, steps
    cdef floating v
    while i + GROUP <= length:
        for j in range(lanes):
            a1[j] = 0
            a2[j] = 0
        steps = 0
        while i + lanes <= length and steps < FLUSH:
            for j in range(lanes):
                v = p[i + j] - centre
                a1[j] += v
                a2[j] += v * v
            i += lanes
            steps += 1
        while i + GROUP <= length and steps < FLUSH:
            for j in range(GROUP):
                v = p[i + j] - centre
                a1[j] += v
                a2[j] += v * v
            i += GROUP
            steps += 1
        sum1[0] += _lanes_sum(a1)
        sum2[0] += _lanes_sum(a2)
    while i < length:
        v = p[i] - centre
        sum1[0] += v
        sum2[0] += <double>v * v
        i += 1


cdef void _runs_block(const floating* x, Geometry* g, Py_ssize_t c, Py_ssize_t block,
                      double* count, double* mean, double* m2,
                      const unsigned short* halves=NULL) noexcept nogil:
    """Mean and M2 of one block of channel c (a group of runs, or a chunk of one run);
    of float16 data `halves` instead of x where given."""
    cdef Block k = _runs_of(g, c, block)
    cdef double s1 = 0.0, s2 = 0.0, total
    cdef floating first, centre
    total = <double>((k.n1 - k.n0) * k.length)
    count[0] = total
    cdef Py_ssize_t start = (k.n0 * g.C + c) * g.M + k.m0
    if floating is float and halves != NULL:
        first = fastbn_half_to_float(halves[start])
    else:
        first = x[start]
    _runs_pieces(x, <const floating*>NULL, halves, NULL, g, &k, first, False, &s1, &s2)
    if _shifted_moments(total, <double>first, s1, s2, mean, m2):
        return
    # Ill-conditioned: again, centred on the mean just found (the block is in cache).
    centre = <floating>mean[0]
    s2 = 0.0
    s1 = 0.0
    _runs_pieces(x, <const floating*>NULL, halves, NULL, g, &k, centre, False, &s1, &s2)
    mean[0] = <double>centre + s1 / total
    m2[0] = s2 - s1 * s1 / total
    if m2[0] < 0.0:
        m2[0] = 0.0


cdef void _runs_block_weighted(const floating* x, Geometry* g, Py_ssize_t c, Py_ssize_t block,
                               const floating* wt, Py_ssize_t ws_n, Py_ssize_t ws_c,
                               Py_ssize_t ws_m,
                               double* count, double* mean, double* m2) noexcept nogil:
    cdef Block k = _runs_of(g, c, block)
    cdef Py_ssize_t n0 = k.n0, n1 = k.n1, m0 = k.m0, length = k.length
    cdef Py_ssize_t n, m
    cdef const floating* p
    cdef const floating* q
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, a, v, centre
    cdef double first = x[(n0 * g.C + c) * g.M + m0]
    for n in range(n0, n1):
        p = x + (n * g.C + c) * g.M + m0
        q = wt + n * ws_n + c * ws_c + m0 * ws_m
        for m in range(length):
            a = q[m * ws_m]
            s0 += a
            s1 += a * (<double>p[m] - first)
    count[0] = s0
    if s0 == 0.0:
        mean[0] = 0.0
        m2[0] = 0.0
        return
    centre = first + s1 / s0
    s1 = 0.0
    for n in range(n0, n1):
        p = x + (n * g.C + c) * g.M + m0
        q = wt + n * ws_n + c * ws_c + m0 * ws_m
        for m in range(length):
            a = q[m * ws_m]
            v = <double>p[m] - centre
            s1 += a * v
            s2 += a * v * v
    mean[0] = centre + s1 / s0
    m2[0] = s2 - s1 * s1 / s0
    if m2[0] < 0.0:
        m2[0] = 0.0


# ---------------------------------------------------------------------------
# all blocks, then the merge

cdef void _merge(Geometry* g, double* count, double* mean, double* m2,
                 double* out_mean, double* out_var, bint weighted,
                 double* tot) noexcept nogil:
    """Chan's merge of each channel's blocks, in block order.

    Block b of channel c is at [b * C + c], its count too.  Unweighted, a block's
    count is the same for every channel, so the loops over channels have no branch
    and vectorise.  `tot`: room for C doubles (weighted running totals).
    """
    cdef Py_ssize_t C = g.C, b, c, i
    cdef double na, nb, n, delta, f, h
    for c in range(C):
        out_mean[c] = mean[c]
        out_var[c] = m2[c]
    if not weighted:
        na = count[0]
        for b in range(1, g.blocks_per_channel):
            nb = count[b * C]
            n = na + nb
            f = nb / n
            h = na * nb / n
            for c in range(C):
                i = b * C + c
                delta = mean[i] - out_mean[c]
                out_mean[c] = out_mean[c] + delta * f
                out_var[c] = out_var[c] + m2[i] + delta * delta * h
            na = n
        for c in range(C):
            out_var[c] = out_var[c] / na
        return
    for c in range(C):
        tot[c] = count[c]
    for b in range(1, g.blocks_per_channel):
        for c in range(C):
            i = b * C + c
            na = tot[c]
            nb = count[i]
            if nb == 0.0:
                continue
            if na == 0.0:
                tot[c] = nb
                out_mean[c] = mean[i]
                out_var[c] = m2[i]
                continue
            n = na + nb
            delta = mean[i] - out_mean[c]
            out_mean[c] = out_mean[c] + delta * (nb / n)
            out_var[c] = out_var[c] + m2[i] + delta * delta * (na * nb / n)
            tot[c] = n
    for c in range(C):
        # A total weight of 0 leaves mean and variance 0, as TF's div_no_nan does.
        if tot[c] != 0.0:
            out_var[c] = out_var[c] / tot[c]


cdef inline void _stats_item(const floating* x, Geometry* g, const floating* wt,
                             Py_ssize_t ws_n, Py_ssize_t ws_c, Py_ssize_t ws_m, double* count,
                             double* mean, double* m2, Py_ssize_t b,
                             const unsigned short* halves=NULL) noexcept nogil:
    """Statistics of block b (see _block); of float16 data `halves` where given (x NULL,
    no weights, F16C builds): the arithmetic on a float32 copy, the same bits."""
    cdef Py_ssize_t j
    cdef double scratch[3 * CHANNEL_TILE]
    cdef Block k = _block(g, b)
    if g.M == 1 and wt == NULL:
        if floating is float and halves != NULL:
            _rows_block_halves(halves, g.C, k.r0, k.r1, k.c0, k.w, scratch,
                               scratch + CHANNEL_TILE, mean + k.slot, m2 + k.slot)
        else:
            _rows_block(x, g.C, k.r0, k.r1, k.c0, k.w, scratch, scratch + CHANNEL_TILE,
                        mean + k.slot, m2 + k.slot)
        for j in range(k.w):
            count[k.slot + j] = <double>(k.r1 - k.r0)
    elif g.M == 1:
        _rows_block_weighted(x, g.C, k.r0, k.r1, k.c0, k.w, wt, ws_n, ws_c, scratch,
                             scratch + CHANNEL_TILE, scratch + 2 * CHANNEL_TILE,
                             count + k.slot, mean + k.slot, m2 + k.slot)
    elif wt == NULL:
        _runs_block(x, g, k.c, k.blk, count + k.slot, mean + k.slot, m2 + k.slot, halves)
    else:
        _runs_block_weighted(x, g, k.c, k.blk, wt, ws_n, ws_c, ws_m, count + k.slot,
                             mean + k.slot, m2 + k.slot)


cdef void _stats(const floating* x, Geometry* g, const floating* wt,
                 Py_ssize_t ws_n, Py_ssize_t ws_c, Py_ssize_t ws_m, int n_threads,
                 double* count, double* mean, double* m2,
                 double* out_mean, double* out_var,
                 const unsigned short* halves=NULL) noexcept nogil:
    """Per-channel mean and variance of x, or of float16 data `halves` (x NULL, no
    weights), block by block, then merged."""
    cdef Py_ssize_t nblocks = _n_blocks(g), b
    cdef int nt = _threads(g.N * g.C * g.M, n_threads)
    if nt == 1:
        for b in range(nblocks):
            _stats_item(x, g, wt, ws_n, ws_c, ws_m, count, mean, m2, b, halves)
    else:
        for b in prange(nblocks, schedule="static", num_threads=nt):
            _stats_item(x, g, wt, ws_n, ws_c, ws_m, count, mean, m2, b, halves)
    # The workspace's spare vector follows m2 (see _workspace).
    _merge(g, count, mean, m2, out_mean, out_var, wt != NULL, m2 + g.blocks_per_channel * g.C)


# ---------------------------------------------------------------------------
# elementwise passes, one traversal for both:
#   normalization  y = (x - m) * k + b, then max(y, 0) if relu        (dy == NULL)
#   input gradient dx = a * dy + w * (k * (x - m) + b), w a weight or 1

cdef inline void _stream_line(floating* dst, const floating* src) noexcept nogil:
    if floating is float:
        fastbn_stream_line_f32(dst, src)
    else:
        fastbn_stream_line_f64(dst, src)


cdef inline Py_ssize_t _to_boundary(const floating* y, Py_ssize_t n,
                                    size_t boundary) noexcept nogil:
    """Elements before y reaches a multiple of `boundary` bytes (all n where y is
    misaligned to its own type)."""
    cdef size_t address = <size_t>y
    cdef Py_ssize_t h
    if address % sizeof(floating) != 0:
        return n
    h = <Py_ssize_t>(((boundary - address % boundary) % boundary) // sizeof(floating))
    return h if h < n else n


cdef inline const floating* _offset(const floating* p, Py_ssize_t i) noexcept nogil:
    """p + i, or NULL for an absent array."""
    if p == NULL:
        return NULL
    return p + i


cdef inline void _affine_row(const floating* xr, const floating* gr, floating* yr,
                             Py_ssize_t n, const floating* m, const floating* k,
                             const floating* b, const floating* a, floating wr,
                             bint relu) noexcept nogil:
    """A stretch of one row (rows layout): per-channel parameters."""
    cdef Py_ssize_t j
    cdef floating v
    if gr != NULL:
        for j in range(n):
            yr[j] = a[j] * gr[j] + wr * (k[j] * (xr[j] - m[j]) + b[j])
    elif relu:
        for j in range(n):
            v = (xr[j] - m[j]) * k[j] + b[j]
            yr[j] = v if v > 0 else 0
    else:
        for j in range(n):
            yr[j] = (xr[j] - m[j]) * k[j] + b[j]


cdef inline void _affine_run(const floating* xr, const floating* gr, floating* yr,
                             Py_ssize_t n, floating mc, floating kc, floating bc, floating ac,
                             const floating* wr, Py_ssize_t ws, bint relu) noexcept nogil:
    """A stretch of one channel's run (runs layout): scalar parameters, weights wr[j * ws]."""
    cdef Py_ssize_t j
    cdef floating v
    if gr != NULL and wr != NULL:
        for j in range(n):
            yr[j] = ac * gr[j] + wr[j * ws] * (kc * (xr[j] - mc) + bc)
    elif gr != NULL:
        for j in range(n):
            yr[j] = ac * gr[j] + (kc * (xr[j] - mc) + bc)
    elif relu:
        for j in range(n):
            v = (xr[j] - mc) * kc + bc
            yr[j] = v if v > 0 else 0
    else:
        for j in range(n):
            yr[j] = (xr[j] - mc) * kc + bc


cdef inline void _affine_row_out(const floating* xr, const floating* gr, floating* yr,
                                 Py_ssize_t n, const floating* m, const floating* k,
                                 const floating* b, const floating* a, floating wr, bint relu,
                                 bint stream) noexcept nogil:
    """_affine_row, its vectors stored from yr's first vector boundary on (a short head
    before it); `stream`: yr's whole cache lines computed a few at a time into a stack
    buffer and streamed from it, the unaligned ends stored plainly."""
    cdef floating piece[PIECE_LINES * LINE_FLOATS]
    cdef Py_ssize_t per = LINE_BYTES // sizeof(floating), i, lines
    cdef Py_ssize_t j = _to_boundary(yr, n, LINE_BYTES if stream else VECTOR_BYTES)
    _affine_row(xr, gr, yr, j, m, k, b, a, wr, relu)
    while stream and j + per <= n:
        lines = (n - j) // per if (n - j) // per < PIECE_LINES else PIECE_LINES
        _affine_row(xr + j, _offset(gr, j), piece, lines * per, m + j, k + j, b + j,
                    _offset(a, j), wr, relu)
        for i in range(lines):
            _stream_line(yr + j + i * per, piece + i * per)
        j += lines * per
    _affine_row(xr + j, _offset(gr, j), yr + j, n - j, m + j, k + j, b + j, _offset(a, j), wr,
                relu)


cdef inline void _affine_run_out(const floating* xr, const floating* gr, floating* yr,
                                 Py_ssize_t n, floating mc, floating kc, floating bc,
                                 floating ac, const floating* wr, Py_ssize_t ws, bint relu,
                                 bint stream) noexcept nogil:
    """_affine_run; `stream`: as in _affine_row_out."""
    cdef floating piece[PIECE_LINES * LINE_FLOATS]
    cdef Py_ssize_t per = LINE_BYTES // sizeof(floating), i, lines
    cdef Py_ssize_t j = 0
    # A short run of the normalization (NCHW 7x7: 49 float32) stores from its start: the
    # scalar head costs it more than the vectors that straddle lines (measured: 7x7
    # inference -15%, training -17%); the input gradient's runs are faster with it.
    if stream or gr != NULL or n * sizeof(floating) >= SHORT_RUN_BYTES:
        j = _to_boundary(yr, n, LINE_BYTES if stream else VECTOR_BYTES)
    _affine_run(xr, gr, yr, j, mc, kc, bc, ac, wr, ws, relu)
    while stream and j + per <= n:
        lines = (n - j) // per if (n - j) // per < PIECE_LINES else PIECE_LINES
        _affine_run(xr + j, _offset(gr, j), piece, lines * per, mc, kc, bc, ac,
                    _offset(wr, j * ws), ws, relu)
        for i in range(lines):
            _stream_line(yr + j + i * per, piece + i * per)
        j += lines * per
    _affine_run(xr + j, _offset(gr, j), yr + j, n - j, mc, kc, bc, ac, _offset(wr, j * ws), ws,
                relu)


cdef void _affine_stretch(const floating* x, const floating* dy, floating* y, Py_ssize_t e0,
                          Py_ssize_t e1, Py_ssize_t C, const floating* mx, const floating* kx,
                          const floating* bx, const floating* ax, Py_ssize_t wrap, bint relu,
                          bint stream) noexcept nogil:
    """Elements e0..e1 of a rows-layout array (no weights); `stream`: y in whole lines
    with non-temporal stores.  Parameters come from arrays extended by wrapping
    (p[i] = p[i % C], i < C + wrap), so that any `wrap` elements read them contiguously."""
    cdef floating piece[PIECE_LINES * LINE_FLOATS]
    cdef Py_ssize_t per = LINE_BYTES // sizeof(floating), e = e0, n, i, c
    cdef Py_ssize_t head_end = e0 + _to_boundary(y + e0, e1 - e0,
                                                 LINE_BYTES if stream else VECTOR_BYTES)
    while e < e1:
        c = e % C
        if e < head_end or e + per > e1 or not stream:
            # Plain stores: the ends of a streamed stretch (or all of it, where y is
            # misaligned to its own type), or a stretch not streamed, whose head runs
            # up to y's first vector boundary so that the rest stores whole vectors.
            n = (head_end if e < head_end else e1) - e
            n = n if n < wrap else wrap
            _affine_row(x + e, _offset(dy, e), y + e, n, mx + c, kx + c, bx + c, _offset(ax, c),
                        1, relu)
        else:
            n = ((e1 - e) // per) * per
            n = n if n < PIECE_LINES * per else PIECE_LINES * per
            _affine_row(x + e, _offset(dy, e), piece, n, mx + c, kx + c, bx + c, _offset(ax, c),
                        1, relu)
            for i in range(n // per):
                _stream_line(y + e + i * per, piece + i * per)
        e += n


cdef inline void _wrapped(floating* ext, const floating* p, Py_ssize_t C,
                          Py_ssize_t width) noexcept nogil:
    """ext[i] = p[i % C] for i < width (width >= C), by doubling copies."""
    cdef Py_ssize_t n = C, piece
    memcpy(ext, p, C * sizeof(floating))
    while n < width:
        piece = n if n < width - n else width - n
        memcpy(ext + n, ext, piece * sizeof(floating))
        n += piece


cdef floating* _wrapped_room(Py_ssize_t width, const floating* phase,
                             void** block) noexcept nogil:
    """Room for four parameter vectors of `width` elements one after another, for
    _affine_stretch; NULL where it cannot be allocated.

    They start at the same offset within a vector as `phase` (the input): where C is
    a multiple of the vector, p + c is then aligned wherever x + e is.  `block`
    receives the allocation to free."""
    cdef char* raw = <char*>malloc(4 * width * sizeof(floating) + VECTOR_BYTES)
    cdef size_t shift
    if raw == NULL:
        return NULL
    block[0] = raw
    shift = (<size_t>phase - <size_t>raw) % VECTOR_BYTES
    if shift % sizeof(floating) != 0:
        shift = 0
    return <floating*>(raw + shift)


cdef floating* _wrapped_parameters(const floating* m, const floating* k, const floating* b,
                                  const floating* a, Py_ssize_t C, Py_ssize_t wrap,
                                  const floating* phase, void** block) noexcept nogil:
    """m, k, b (and a, where given) one after another, each extended by wrapping to
    C + wrap elements, in _wrapped_room; NULL where it cannot be allocated."""
    cdef Py_ssize_t width = C + wrap
    cdef floating* ext = _wrapped_room(width, phase, block)
    cdef int v
    if ext == NULL:
        return NULL
    for v in range(4):
        _wrapped_parameter(ext, width, v, m, k, b, a, C)
    return ext


cdef inline void _wrapped_parameter(floating* ext, Py_ssize_t width, int v, const floating* m,
                                    const floating* k, const floating* b, const floating* a,
                                    Py_ssize_t C) noexcept nogil:
    """The v-th of m, k, b, a (0-3) wrapped into its place in _wrapped_room's `ext`
    (nothing for a NULL one)."""
    cdef const floating* p = m if v == 0 else k if v == 1 else b if v == 2 else a
    if p != NULL:
        _wrapped(ext + v * width, p, C, width)


cdef inline Py_ssize_t _norm_tiles(Geometry* g) noexcept nogil:
    """How many tiles of NORM_TILE channels x NORM_ROWS rows cover rows wider than
    NORM_TILE (the elementwise passes' work items there)."""
    return ((g.N + NORM_ROWS - 1) // NORM_ROWS) * ((g.C + NORM_TILE - 1) // NORM_TILE)


cdef inline Block _norm_tile(Geometry* g, Py_ssize_t item) noexcept nogil:
    """Where tile `item` of _norm_tiles lies: rows r0..r1, channels c0..c0 + w."""
    cdef Block t
    cdef Py_ssize_t n_tiles = (g.C + NORM_TILE - 1) // NORM_TILE
    memset(&t, 0, sizeof(Block))
    t.r0 = (item // n_tiles) * NORM_ROWS
    t.r1 = t.r0 + NORM_ROWS if t.r0 + NORM_ROWS < g.N else g.N
    t.c0 = (item % n_tiles) * NORM_TILE
    t.w = g.C - t.c0 if g.C - t.c0 < NORM_TILE else NORM_TILE
    return t


cdef inline Py_ssize_t _runs_per_item(Py_ssize_t M) noexcept nogil:
    """Runs in one work item of the elementwise passes: about STRETCH values, so that a
    short run (NCHW 7x7: 49 values) does not cost an item's bookkeeping of its own."""
    return STRETCH // M if M < STRETCH else 1


cdef inline void _halves_row(const unsigned short* x, const unsigned short* dy,
                             unsigned short* y, Py_ssize_t n, const float* m, const float* k,
                             const float* b, const float* a, bint per_value,
                             bint relu) noexcept nogil:
    """_affine_row (per_value) or _affine_run (m, k, b, a at [0]) on float16 x (and dy),
    y float16 (F16C builds): the float32 arithmetic, rounded once, converted in
    registers."""
    if dy == NULL:
        fastbn_affine_halves(x, y, n, m, k, b, per_value, relu)
    else:
        fastbn_grad_halves(x, dy, y, n, m, k, b, a, per_value)


cdef void _halves_stretch(const unsigned short* x, const unsigned short* dy, unsigned short* y,
                          Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t C, const float* mx,
                          const float* kx, const float* bx, const float* ax, Py_ssize_t wrap,
                          bint relu) noexcept nogil:
    """_affine_stretch of float16 data (stored plainly): up to `wrap` elements a time."""
    cdef Py_ssize_t e = e0, n, c
    while e < e1:
        c = e % C
        n = e1 - e if e1 - e < wrap else wrap
        _halves_row(x + e, NULL if dy == NULL else dy + e, y + e, n, mx + c, kx + c, bx + c,
                    NULL if ax == NULL else ax + c, True, relu)
        e += n


cdef inline void _after(floating* y, unsigned short* yh, Py_ssize_t lo, Py_ssize_t hi,
                        int kind, bint wide) noexcept nogil:
    """The activation `kind` (none where negative) of y[lo:hi] (of yh[lo:hi] where given:
    float16 data), in place, just after the normalization wrote it: from the cache, where
    a pass of its own would read and write the whole array again."""
    if kind < 0 or hi <= lo:
        return
    if floating is float and yh != NULL:
        _activation_part(NULL, <const char*>yh, <char*>yh, lo, hi, kind, cnp.NPY_FLOAT16, wide)
    else:
        _activation_part(NULL, <const char*>y, <char*>y, lo, hi, kind,
                         cnp.NPY_FLOAT32 if floating is float else cnp.NPY_FLOAT64, wide)


cdef inline void _affine_item(const floating* x, const floating* dy, floating* y, Geometry* g,
                              const floating* m, const floating* k, const floating* b,
                              const floating* a, const floating* wt, Py_ssize_t ws_n,
                              Py_ssize_t ws_m, bint relu, bint stream, const floating* ext,
                              Py_ssize_t wrap, Py_ssize_t item, const unsigned short* xh,
                              const unsigned short* dyh, unsigned short* yh, int after,
                              bint wide) noexcept nogil:
    """One work item of _affine: a stretch of STRETCH elements (where `ext` holds the
    wrapped parameters), a tile of NORM_ROWS wide rows, a row, or consecutive runs
    (_runs_per_item); of float16 data xh, dyh, yh where xh is given (floating float, no
    weights, not streamed); then the activation `after` of what it wrote (see _after)."""
    cdef Py_ssize_t C = g.C, M = g.M, N = g.N, r, c, c0, i, n, per, first
    cdef Py_ssize_t width = C + wrap, e0 = item * STRETCH, e1
    cdef bint halves = floating is float and xh != NULL
    cdef Block t
    if ext != NULL:
        e1 = e0 + STRETCH if e0 + STRETCH < N * C else N * C
        if floating is float and halves:
            _halves_stretch(xh, dyh, yh, e0, e1, C, ext, ext + width, ext + 2 * width,
                            NULL if a == NULL else ext + 3 * width, wrap, relu)
        else:
            _affine_stretch(x, dy, y, e0, e1, C, ext, ext + width, ext + 2 * width,
                            NULL if a == NULL else ext + 3 * width, wrap, relu, stream)
        _after(y, yh, e0, e1, after, wide)
    elif M == 1:
        if C > NORM_TILE:
            t = _norm_tile(g, item)
        else:
            t.r0 = item
            t.r1 = item + 1
            t.c0 = 0
            t.w = C
        c0 = t.c0
        for r in range(t.r0, t.r1):
            i = r * C + c0
            if floating is float and halves:
                _halves_row(xh + i, NULL if dyh == NULL else dyh + i, yh + i, t.w, m + c0,
                            k + c0, b + c0, _offset(a, c0), True, relu)
            else:
                _affine_row_out(x + i, _offset(dy, i), y + i, t.w, m + c0, k + c0, b + c0,
                                _offset(a, c0), 1 if wt == NULL else wt[r * ws_n], relu,
                                stream)
            _after(y, yh, i, i + t.w, after, wide)
    else:
        per = _runs_per_item(M)
        r = item * per
        first = r
        e1 = r + per if r + per < N * C else N * C
        c = r % C
        n = r // C
        while r < e1:
            i = r * M
            if floating is float and halves:
                _halves_row(xh + i, NULL if dyh == NULL else dyh + i, yh + i, M, m + c, k + c,
                            b + c, _offset(a, c), False, relu)
            else:
                _affine_run_out(x + i, _offset(dy, i), y + i, M, m[c], k[c], b[c],
                                0 if a == NULL else a[c], _offset(wt, n * ws_n), ws_m, relu,
                                stream)
            r += 1
            c += 1
            if c == C:
                c = 0
                n += 1
        _after(y, yh, first * M, e1 * M, after, wide)


cdef void _affine(const floating* x, const floating* dy, floating* y, Geometry* g,
                  const floating* m, const floating* k, const floating* b, const floating* a,
                  const floating* wt, Py_ssize_t ws_n, Py_ssize_t ws_m, bint relu,
                  bint stream, int n_threads, const unsigned short* xh=NULL,
                  const unsigned short* dyh=NULL, unsigned short* yh=NULL, int after=-1,
                  bint wide=False) noexcept nogil:
    """The elementwise pass over a whole (N, C, M) array; see above for the formulas.
    `stream`: write y with non-temporal stores.  float16 data (F16C builds) comes as xh,
    dyh and yh instead of x, dy and y (floating float, no weights, not streamed): the
    float32 arithmetic, rounded once.  `after`: an activation applied to each item's
    output as it is written (see _after; not with `stream`).

    Wide rows go in tiles of NORM_TILE channels x NORM_ROWS rows, so that a tile's
    parameters stay in L1 across its rows; narrower rows in stretches across row
    boundaries (one at a time where rows have weights); runs one at a time.

    Each thread takes a contiguous share of the items, as a static schedule would, and
    goes through it backwards: the pass before this one (statistics, gradient sums)
    read the same share forwards, so its last lines are the ones still in the core's
    cache, and the ones this pass reads last are the next call's first.
    """
    cdef Py_ssize_t n_items, wrap = _wrap(g, wt)
    cdef int nt = _threads(g.N * g.C * g.M, n_threads)
    cdef floating* ext = NULL
    cdef void* ext_block = NULL
    if wrap:
        ext = _wrapped_parameters(m, k, b, a, g.C, wrap, x, &ext_block)
    n_items = _affine_items(g, ext != NULL)
    if nt == 1:
        # An OpenMP region costs about a microsecond even on one thread: small calls skip it.
        _affine_share(x, dy, y, g, m, k, b, a, wt, ws_n, ws_m, relu, stream, ext, wrap, n_items,
                      xh, dyh, yh, after, wide)
    else:
        with parallel(num_threads=nt):
            _affine_share(x, dy, y, g, m, k, b, a, wt, ws_n, ws_m, relu, stream, ext, wrap,
                          n_items, xh, dyh, yh, after, wide)
    free(ext_block)


cdef inline Py_ssize_t _wrap(Geometry* g, const floating* wt) noexcept nogil:
    """How far _affine extends the parameters by wrapping (0: it does not), for rows of
    at most NORM_TILE channels without weights, which it takes in stretches."""
    if g.M == 1 and g.C <= NORM_TILE and wt == NULL:
        return g.N * g.C if g.N * g.C < WRAP else WRAP
    return 0


cdef inline Py_ssize_t _affine_items(Geometry* g, bint wrapped) noexcept nogil:
    """How many work items _affine_item cuts (N, C, M) into (`wrapped`: it has the
    wrapped parameters)."""
    if wrapped:
        return (g.N * g.C + STRETCH - 1) // STRETCH
    if g.M == 1 and g.C > NORM_TILE:
        return _norm_tiles(g)
    if g.M == 1:
        return g.N
    return (g.N * g.C + _runs_per_item(g.M) - 1) // _runs_per_item(g.M)


cdef void _affine_share(const floating* x, const floating* dy, floating* y, Geometry* g,
                        const floating* m, const floating* k, const floating* b,
                        const floating* a, const floating* wt, Py_ssize_t ws_n,
                        Py_ssize_t ws_m, bint relu, bint stream, const floating* ext,
                        Py_ssize_t wrap, Py_ssize_t n_items, const unsigned short* xh,
                        const unsigned short* dyh, unsigned short* yh, int after,
                        bint wide) noexcept nogil:
    """The calling thread's share of _affine's n_items items (all of them outside a
    parallel block), last first."""
    cdef Py_ssize_t lo = _share_end(n_items, 0), item = _share_end(n_items, 1) - 1
    while item >= lo:
        _affine_item(x, dy, y, g, m, k, b, a, wt, ws_n, ws_m, relu, stream, ext, wrap, item,
                     xh, dyh, yh, after, wide)
        item = item - 1
    if stream:
        fastbn_stream_fence()


# ---------------------------------------------------------------------------
# gradient: per-channel sums of dy and dy * (x - mean), then dx elementwise

cdef inline void _grad_rows_sums(const floating* xr, const floating* gr, Py_ssize_t stride,
                                 Py_ssize_t n, const floating* cen, Py_ssize_t w,
                                 floating* s1, floating* s2) noexcept nogil:
    """Adds sum(dy) and sum(dy * (x - cen)) of n rows `stride` apart into s1[j], s2[j]
    (local arrays of the caller, as in _rows_sums)."""
    cdef Py_ssize_t r = 0, j
    cdef const floating* x0
    cdef const floating* g0
    cdef floating v, v1
    # Two rows per visit of the accumulators.
    while r + 2 <= n:
        x0 = xr + r * stride
        g0 = gr + r * stride
        for j in range(w):
            v = g0[j]
            v1 = g0[j + stride]
            s1[j] += v + v1
            s2[j] += v * (x0[j] - cen[j]) + v1 * (x0[j + stride] - cen[j])
        r += 2
    while r < n:
        x0 = xr + r * stride
        g0 = gr + r * stride
        for j in range(w):
            v = g0[j]
            s1[j] += v
            s2[j] += v * (x0[j] - cen[j])
        r += 1


cdef inline void _grad_rows_flush(const floating* x, const floating* dy, Py_ssize_t C,
                                  Py_ssize_t r, Py_ssize_t r_end, Py_ssize_t c0, Py_ssize_t w,
                                  const floating* cen, double* d1, double* d2,
                                  const unsigned short* x_halves,
                                  const unsigned short* dy_halves) noexcept nogil:
    """Adds sum(dy) and sum(dy * (x - cen)) of rows r..r_end (at most FLUSH) of channels
    c0..c0 + w (w <= CHANNEL_TILE) into d1[j], d2[j]: one flush of a rows block's float
    sums (local arrays, as in _rows_block).  Of float16 data x_halves and dy_halves where
    given (floating float, F16C builds): a piece of rows at a time widened, as in
    _rows_block_halves."""
    cdef Py_ssize_t j, p_end, i, piece = _piece_rows(w)
    cdef floating s1[CHANNEL_TILE]
    cdef floating s2[CHANNEL_TILE]
    cdef float bx[SUMS_PIECE]
    cdef float bd[SUMS_PIECE]
    for j in range(w):
        s1[j] = 0
        s2[j] = 0
    if floating is float and x_halves != NULL:
        while r < r_end:
            p_end = r + piece if r + piece < r_end else r_end
            for i in range(r, p_end):
                fastbn_halves_to_floats(x_halves + i * C + c0, bx + (i - r) * w, w)
                fastbn_halves_to_floats(dy_halves + i * C + c0, bd + (i - r) * w, w)
            _grad_rows_sums(bx, bd, w, p_end - r, cen, w, s1, s2)
            r = p_end
    else:
        _grad_rows_sums(x + r * C + c0, dy + r * C + c0, C, r_end - r, cen, w, s1, s2)
    for j in range(w):
        d1[j] += s1[j]
        d2[j] += s2[j]


cdef inline void _grad_rows_flush_wide(const floating* x, const floating* dy, Py_ssize_t C,
                                       Py_ssize_t r, Py_ssize_t r_end, Py_ssize_t c0,
                                       Py_ssize_t w, const floating* cen, floating* s1,
                                       floating* s2, double* d1, double* d2) noexcept nogil:
    """_grad_rows_flush of up to SUMS_ROW channels, its float sums in s1 and s2 (the
    caller's scratch)."""
    cdef Py_ssize_t j
    for j in range(w):
        s1[j] = 0
        s2[j] = 0
    _grad_rows_sums(x + r * C + c0, dy + r * C + c0, C, r_end - r, cen, w, s1, s2)
    for j in range(w):
        d1[j] += s1[j]
        d2[j] += s2[j]


cdef void _grad_rows_blocks(const floating* x, const floating* dy, Geometry* g,
                            const double* mean, double* part1, double* part2, Py_ssize_t b0,
                            Py_ssize_t b1, const unsigned short* x_halves,
                            const unsigned short* dy_halves) noexcept nogil:
    """The gradient sums of rows blocks b0..b1 (see _block) into part1/part2 at their slots.

    Each row tile's next FLUSH rows go through all of its channel tiles (in the range)
    before the rows after them: the reading goes down the rows, so the last rows, all their
    channels, are what it leaves in L2, and the input gradient's pass (which goes
    backwards) starts there (tile by tile instead, the backward took 20-27 us longer on 2-D
    256x4096, 9-12 us on NHWC 32x7x7x512).  Each block still adds its flushes in row
    order: the same bits.  float32 and float64 rows wider than a channel tile go
    through _grad_rows_blocks_wide instead, where its scratch can be had."""
    cdef Py_ssize_t b = b0, last, bb, r, r_end, j
    cdef Block k
    cdef floating cen[CHANNEL_TILE]
    cdef floating* scratch = NULL
    if x_halves == NULL and g.n_channel_tiles > 1:
        # (On the heap: 48 KB of float32, 96 KB of float64, too much for small thread
        # stacks.)
        scratch = <floating*>malloc((3 * SUMS_ROW + 32) * sizeof(floating))
    if scratch != NULL:
        _grad_rows_blocks_wide(x, dy, g, mean, part1, part2, b0, b1, scratch)
        free(scratch)
        return
    while b < b1:
        last = (b // g.n_channel_tiles + 1) * g.n_channel_tiles
        if last > b1:
            last = b1
        for bb in range(b, last):
            k = _block(g, bb)
            for j in range(k.w):
                part1[k.slot + j] = 0.0
                part2[k.slot + j] = 0.0
        # (The blocks of a row tile share its rows.)
        r = k.r0
        while r < k.r1:
            r_end = r + FLUSH if r + FLUSH < k.r1 else k.r1
            for bb in range(b, last):
                k = _block(g, bb)
                for j in range(k.w):
                    cen[j] = <floating>mean[k.c0 + j]
                _grad_rows_flush(x, dy, g.C, r, r_end, k.c0, k.w, cen, part1 + k.slot,
                                 part2 + k.slot, x_halves, dy_halves)
            r = r_end
        # The centre the data type used differs from mean by a rounding: correct for it.
        for bb in range(b, last):
            k = _block(g, bb)
            for j in range(k.w):
                part2[k.slot + j] += ((<double><floating>mean[k.c0 + j] - mean[k.c0 + j])
                                      * part1[k.slot + j])
        b = last


cdef void _grad_rows_blocks_wide(const floating* x, const floating* dy, Geometry* g,
                                 const double* mean, double* part1, double* part2,
                                 Py_ssize_t b0, Py_ssize_t b1, floating* scratch) noexcept nogil:
    """_grad_rows_blocks of float32 or float64 data, a thread's channels of a row tile
    SUMS_ROW at a time: the same flushes of the same rows, so the same bits.  `scratch`:
    room for 3 * SUMS_ROW + 32 values (the float sums, s2 a line past s1's end: a
    multiple of 4 KB between them would make every s2[j] contend with s1[j] for the same
    L1 set; then the centres).  (A loop of its own: _grad_rows_blocks' loop with the width
    and scratch as parameters, or this one called with fixed widths, gives the same bits
    but made the 2-D backward 1-4% slower in eleven A/B runs: GCC compiled the sums
    loop differently, in one version with its bound kept on the stack.)"""
    cdef Py_ssize_t b = b0, last, r, r_end, j, c_lo, c_hi, c0, w, at
    cdef floating* s1 = scratch
    cdef floating* s2 = scratch + SUMS_ROW + 16
    cdef floating* cen = s2 + SUMS_ROW + 16
    cdef Block k
    while b < b1:
        last = (b // g.n_channel_tiles + 1) * g.n_channel_tiles
        if last > b1:
            last = b1
        # The blocks of a row tile share its rows and lie side by side, in it and in
        # part1/part2: channels c_lo..c_hi from slot `at`.
        c_lo = _block(g, b).c0
        k = _block(g, last - 1)
        c_hi = k.c0 + k.w
        at = k.rt * g.C
        for j in range(c_lo, c_hi):
            part1[at + j] = 0.0
            part2[at + j] = 0.0
        r = k.r0
        while r < k.r1:
            r_end = r + FLUSH if r + FLUSH < k.r1 else k.r1
            c0 = c_lo
            while c0 < c_hi:
                w = c_hi - c0 if c_hi - c0 < SUMS_ROW else SUMS_ROW
                for j in range(w):
                    cen[j] = <floating>mean[c0 + j]
                _grad_rows_flush_wide(x, dy, g.C, r, r_end, c0, w, cen, s1, s2,
                                      part1 + at + c0, part2 + at + c0)
                c0 += w
            r = r_end
        # The centre the data type used differs from mean by a rounding: correct for it.
        for j in range(c_lo, c_hi):
            part2[at + j] += (<double><floating>mean[j] - mean[j]) * part1[at + j]
        b = last


cdef inline void _grad_run_sums(const floating* x, const floating* dy, Py_ssize_t length,
                                floating centre, double* sum1, double* sum2) noexcept nogil:
    """Adds sum(dy) and sum(dy * (x - centre)) over a run, in the lanes and steps of
    _run_sums."""
    cdef floating a1[32]
    cdef floating a2[32]
    cdef int lanes = 32 if floating is float else 16
    cdef Py_ssize_t i = 0, j, steps
    cdef floating v
    while i + GROUP <= length:
        for j in range(lanes):
            a1[j] = 0
            a2[j] = 0
        steps = 0
        while i + lanes <= length and steps < FLUSH:
            for j in range(lanes):
                v = dy[i + j]
                a1[j] += v
                a2[j] += v * (x[i + j] - centre)
            i += lanes
            steps += 1
        while i + GROUP <= length and steps < FLUSH:
            for j in range(GROUP):
                v = dy[i + j]
                a1[j] += v
                a2[j] += v * (x[i + j] - centre)
            i += GROUP
            steps += 1
        sum1[0] += _lanes_sum(a1)
        sum2[0] += _lanes_sum(a2)
    while i < length:
        sum1[0] += dy[i]
        sum2[0] += <double>dy[i] * (x[i] - centre)
        i += 1


cdef inline void _copy(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fastbn_copy_f32(dst, src, n)
    else:
        fastbn_copy_f64(dst, src, n)


cdef void _runs_pieces(const floating* x, const floating* dy, const unsigned short* x_halves,
                       const unsigned short* dy_halves, Geometry* g, Block* k, floating centre,
                       bint grad, double* s1, double* s2) noexcept nogil:
    """Adds what _run_sums (or, with `grad`, _grad_run_sums) gives over the runs of block k
    into s1[0], s2[0], piece by piece: whole runs gathered together while they fit in
    SUMS_PIECE values (short runs, NCHW 7x7's 49 values, then share their lanes and their
    flushes), a longer run SUMS_PIECE values at a time (whole steps of the lanes).  Of x and
    dy, or of float16 x_halves and dy_halves where given (floating float, F16C builds):
    widened into the pieces, the same bits."""
    cdef floating bx[SUMS_PIECE]
    cdef floating bd[SUMS_PIECE]
    cdef const floating* px
    cdef const floating* pd
    cdef bint halves = floating is float and x_halves != NULL
    cdef Py_ssize_t L = k.length, n = k.n0, m, runs, j, size, at
    # The sums in locals: through the pointers every addition of a piece's tail would be
    # a store and a load (the two may alias).
    cdef double t1 = s1[0], t2 = s2[0]
    while n < k.n1:
        runs = SUMS_PIECE // L if L <= SUMS_PIECE else 1
        if runs > k.n1 - n:
            runs = k.n1 - n
        m = 0
        while m < L:
            size = L - m if L - m < SUMS_PIECE else SUMS_PIECE
            at = (n * g.C + k.c) * g.M + k.m0 + m
            px = bx
            pd = bd
            if floating is float and halves:
                for j in range(runs):
                    fastbn_halves_to_floats(x_halves + at + j * g.C * g.M, bx + j * size, size)
                    if grad:
                        fastbn_halves_to_floats(dy_halves + at + j * g.C * g.M, bd + j * size,
                                                size)
            elif runs > 1:
                # (Not memcpy: a library call per run of 49 values cost as much as summing
                # it.)
                for j in range(runs):
                    _copy(bx + j * size, x + at + j * g.C * g.M, size)
                    if grad:
                        _copy(bd + j * size, dy + at + j * g.C * g.M, size)
            else:
                # One run's piece: read where it lies.
                px = x + at
                pd = dy + at if grad else NULL
            if grad:
                _grad_run_sums(px, pd, runs * size, centre, &t1, &t2)
            else:
                _run_sums(px, runs * size, centre, &t1, &t2)
            m += size
        n += runs
    s1[0] = t1
    s2[0] = t2


cdef void _grad_runs_block(const floating* x, const floating* dy, Geometry* g, Py_ssize_t c,
                           Py_ssize_t blk, const double* mean, double* sum1, double* sum2,
                           const unsigned short* x_halves=NULL,
                           const unsigned short* dy_halves=NULL) noexcept nogil:
    """sum(dy) and sum(dy * (x - mean[c])) over block blk of channel c (runs layout),
    into sum1[0] and sum2[0]; of float16 data x_halves and dy_halves where given."""
    cdef Block k = _runs_of(g, c, blk)
    cdef double s1 = 0.0, s2 = 0.0
    cdef floating centre = <floating>mean[c]
    _runs_pieces(x, dy, x_halves, dy_halves, g, &k, centre, True, &s1, &s2)
    sum1[0] = s1
    # The centre the data type used differs from mean by a rounding: correct for it.
    sum2[0] = s2 + (<double>centre - mean[c]) * s1


cdef inline void _grad_runs_item(const floating* x, const floating* dy, Geometry* g,
                                 const double* mean, double* part1, double* part2,
                                 Py_ssize_t b, const unsigned short* x_halves=NULL,
                                 const unsigned short* dy_halves=NULL) noexcept nogil:
    """The gradient sums of runs block b (the blocks of _stats), into part1/part2; of
    float16 data x_halves and dy_halves where given (x and dy NULL, F16C builds): the
    arithmetic on float32 copies, the same bits."""
    cdef Block k = _block(g, b)
    _grad_runs_block(x, dy, g, k.c, k.blk, mean, part1 + k.slot, part2 + k.slot, x_halves,
                     dy_halves)


cdef void _grad_sums(const floating* x, const floating* dy, Geometry* g, const double* mean,
                     int n_threads, double* part1, double* part2, double* out1,
                     double* out2, const unsigned short* x_halves=NULL,
                     const unsigned short* dy_halves=NULL) noexcept nogil:
    """Per-channel sum(dy) and sum(dy * (x - mean)): block partials, summed in block order.
    float16 data as x_halves and dy_halves (x and dy NULL)."""
    cdef int nt = _threads(g.N * g.C * g.M, n_threads)
    if nt == 1:
        _grad_share(x, dy, g, mean, part1, part2, x_halves, dy_halves)
    else:
        with parallel(num_threads=nt):
            _grad_share(x, dy, g, mean, part1, part2, x_halves, dy_halves)
    _grad_merge(g, part1, part2, out1, out2, 0, g.C)


cdef void _grad_share(const floating* x, const floating* dy, Geometry* g, const double* mean,
                      double* part1, double* part2, const unsigned short* x_halves,
                      const unsigned short* dy_halves) noexcept nogil:
    """The calling thread's contiguous share of the gradient sums' blocks (all of them
    outside a parallel block), into part1/part2 at their slots."""
    cdef Py_ssize_t nblocks = _n_blocks(g), b
    cdef Py_ssize_t b0 = _share_end(nblocks, 0), b1 = _share_end(nblocks, 1)
    if g.M == 1:
        _grad_rows_blocks(x, dy, g, mean, part1, part2, b0, b1, x_halves, dy_halves)
    else:
        for b in range(b0, b1):
            _grad_runs_item(x, dy, g, mean, part1, part2, b, x_halves, dy_halves)


cdef void _grad_merge(Geometry* g, const double* part1, const double* part2, double* out1,
                      double* out2, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """out1, out2 for channels lo..hi: their blocks' partials summed in block order."""
    cdef Py_ssize_t C = g.C, b, c
    for c in range(lo, hi):
        out1[c] = part1[c]
        out2[c] = part2[c]
    for b in range(1, g.blocks_per_channel):
        for c in range(lo, hi):
            out1[c] += part1[b * C + c]
            out2[c] += part2[b * C + c]


# ---------------------------------------------------------------------------
# Python entry points (arrays checked and prepared by the backend)

cdef inline void _require(cnp.ndarray a, int typenum, str what, int ndim=-1) except *:
    """Raises unless a is a C-contiguous array of dtype `typenum` with ndim dimensions
    (any number of them for -1): the kernels read the shapes they take without bounds."""
    if cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise TypeError(f"{what} must be a C-contiguous array of the kernel's dtype")
    if ndim >= 0 and a.ndim != ndim:
        raise ValueError(f"{what} must have {ndim} dimensions, got {a.ndim}")


cdef inline bint _is_float32(cnp.ndarray x) except -1:
    cdef int t = cnp.PyArray_TYPE(x)
    if t == cnp.NPY_FLOAT32:
        return True
    if t == cnp.NPY_FLOAT64:
        return False
    raise TypeError("x must be float32 or float64")


cdef double* _workspace(Geometry* g, Py_ssize_t extra=0) except NULL:
    """Per-block statistics (3 x blocks x C doubles), a spare vector of C doubles and
    `extra` vectors more, in one allocation; after the blocks are merged, its start
    holds four per-channel vectors."""
    cdef double* w = <double*>malloc((3 * g.blocks_per_channel + 1 + extra) * g.C
                                     * sizeof(double) + 8)
    if w == NULL:
        raise MemoryError()
    return w


cdef inline void _check_vector(cnp.ndarray v, int t, Py_ssize_t C, str what) except *:
    """Raises unless v is a C-contiguous vector of C values of x's dtype `t` or float64."""
    if v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"{what} must be a vector of one value per channel")
    if cnp.PyArray_TYPE(v) != cnp.NPY_FLOAT64:
        _require(v, t, what)
    elif not cnp.PyArray_IS_C_CONTIGUOUS(v):
        raise TypeError(f"{what} must be a C-contiguous array")


cdef inline const double* _doubles(cnp.ndarray v, double* scratch):
    """A vector that passed _check_vector as doubles: its own data where it is float64,
    else converted from float32 into `scratch` (room for its values)."""
    cdef Py_ssize_t c
    cdef const float* f
    if cnp.PyArray_TYPE(v) == cnp.NPY_FLOAT64:
        return <const double*>cnp.PyArray_DATA(v)
    f = <const float*>cnp.PyArray_DATA(v)
    for c in range(v.shape[0]):
        scratch[c] = f[c]
    return scratch


def f16c_enabled():
    """Whether this build converts float16 itself (halves_to_floats, floats_to_halves)."""
    return bool(fastbn_have_f16c())


cdef inline void _convert_range(const void* src, void* dst, Py_ssize_t lo, Py_ssize_t hi,
                                bint to_floats) noexcept nogil:
    if to_floats:
        fastbn_halves_to_floats(<const unsigned short*>src + lo, <float*>dst + lo, hi - lo)
    else:
        fastbn_floats_to_halves(<const float*>src + lo, <unsigned short*>dst + lo, hi - lo)


cdef void _convert(const void* src, void* dst, Py_ssize_t n, bint to_floats,
                   int n_threads) noexcept nogil:
    cdef Py_ssize_t pieces = (n + BLOCK - 1) // BLOCK, p, lo, hi
    cdef int nt = _threads(n, n_threads)
    if nt == 1:
        # An OpenMP region costs about a microsecond even on one thread.
        _convert_range(src, dst, 0, n, to_floats)
        return
    for p in prange(pieces, schedule="static", num_threads=nt):
        lo = p * BLOCK
        hi = lo + BLOCK if lo + BLOCK < n else n
        _convert_range(src, dst, lo, hi, to_floats)


cdef void _check_conversion(cnp.ndarray src, int src_type, cnp.ndarray dst,
                            int dst_type) except *:
    if not fastbn_have_f16c():
        raise RuntimeError("this build of the kernels has no float16 conversions")
    _require(src, src_type, "src")
    _require(dst, dst_type, "dst")
    if cnp.PyArray_SIZE(src) != cnp.PyArray_SIZE(dst):
        raise ValueError("src and dst must have the same size")


def halves_to_floats(cnp.ndarray src, cnp.ndarray dst, int n_threads):
    """dst = src, a C-contiguous float16 array into a C-contiguous float32 one of its size
    (exact).  Only where f16c_enabled()."""
    _check_conversion(src, cnp.NPY_FLOAT16, dst, cnp.NPY_FLOAT32)
    cdef void* s = cnp.PyArray_DATA(src)
    cdef void* d = cnp.PyArray_DATA(dst)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    with nogil:
        _convert(s, d, n, True, n_threads)


def floats_to_halves(cnp.ndarray src, cnp.ndarray dst, int n_threads):
    """dst = src rounded to float16 (to nearest even, as NumPy's astype), a C-contiguous
    float32 array into a C-contiguous float16 one of its size.  Only where
    f16c_enabled()."""
    _check_conversion(src, cnp.NPY_FLOAT32, dst, cnp.NPY_FLOAT16)
    cdef void* s = cnp.PyArray_DATA(src)
    cdef void* d = cnp.PyArray_DATA(dst)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src)
    with nogil:
        _convert(s, d, n, False, n_threads)


cdef void _activation_halves(const unsigned short* dy, const unsigned short* v,
                             unsigned short* out, Py_ssize_t lo, Py_ssize_t hi, int kind,
                             bint wide) noexcept nogil:
    """_activation_part on float16 data (F16C builds): in float32, a piece at a time,
    rounded once."""
    cdef float bd[SUMS_PIECE]
    cdef float bv[SUMS_PIECE]
    cdef Py_ssize_t i = lo, n
    while i < hi:
        n = hi - i if hi - i < SUMS_PIECE else SUMS_PIECE
        fastbn_halves_to_floats(v + i, bv, n)
        if dy == NULL:
            fastbn_activation_f32(bv, bv, n, kind, -0.0, wide)
        else:
            fastbn_halves_to_floats(dy + i, bd, n)
            fastbn_activation_grad_f32(bd, bv, bv, n, kind)
        fastbn_floats_to_halves(bv, out + i, n)
        i += n


cdef inline void _activation_part(const char* dy, const char* v, char* out,
                                  Py_ssize_t lo, Py_ssize_t hi, int kind, int typenum,
                                  bint wide) noexcept nogil:
    """out[lo:hi] = the activation of v (dy NULL; in AVX-512 where `wide`), or the
    gradient through it given the output gradient dy and its output v."""
    if typenum == cnp.NPY_FLOAT32:
        if dy == NULL:
            fastbn_activation_f32(<const float*>v + lo, <float*>out + lo, hi - lo, kind, 0.0,
                                  wide)
        else:
            fastbn_activation_grad_f32(<const float*>dy + lo, <const float*>v + lo,
                                       <float*>out + lo, hi - lo, kind)
    elif typenum == cnp.NPY_FLOAT64:
        if dy == NULL:
            fastbn_activation_f64(<const double*>v + lo, <double*>out + lo, hi - lo, kind,
                                  0.0, wide)
        else:
            fastbn_activation_grad_f64(<const double*>dy + lo, <const double*>v + lo,
                                       <double*>out + lo, hi - lo, kind)
    else:
        _activation_halves(<const unsigned short*>dy, <const unsigned short*>v,
                           <unsigned short*>out, lo, hi, kind, wide)


cdef void _activation_pieces(const char* dy, const char* v, char* out, Py_ssize_t n,
                             int kind, int typenum, bint wide, int n_threads) noexcept nogil:
    cdef Py_ssize_t pieces = (n + BLOCK - 1) // BLOCK, p, lo, hi
    cdef int nt = _threads(n, n_threads)
    if nt == 1:
        _activation_part(dy, v, out, 0, n, kind, typenum, wide)
        return
    for p in prange(pieces, schedule="static", num_threads=nt):
        lo = p * BLOCK
        hi = lo + BLOCK if lo + BLOCK < n else n
        _activation_part(dy, v, out, lo, hi, kind, typenum, wide)


cdef int _activation_operands(cnp.ndarray first, str first_name, cnp.ndarray v, str v_name,
                              cnp.ndarray out, int kind) except -1:
    """The type number of C-contiguous arrays of one dtype and size, checked."""
    cdef int t = cnp.PyArray_TYPE(first)
    if not (t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64
            or (t == cnp.NPY_FLOAT16 and fastbn_have_f16c())):
        raise TypeError(f"{first_name} must be float32 or float64 (or float16 in a build "
                        f"with F16C)")
    if kind < 0 or kind > 4:
        raise ValueError(f"kind must be 0 to 4, got {kind}")
    _require(first, t, first_name)
    _require(v, t, v_name)
    _require(out, t, "out")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(first)
    if cnp.PyArray_SIZE(v) != n or cnp.PyArray_SIZE(out) != n:
        raise ValueError(f"{first_name}, {v_name} and out must have the same size")
    return t


def wide_enabled():
    """Whether this build has the activations' loops for AVX-512 and this CPU runs them."""
    return bool(fastbn_have_wide())


cdef inline int _check_wide(bint wide) except -1:
    if wide and not fastbn_have_wide():
        raise ValueError("wide needs wide_enabled()")
    return 0


def activation(cnp.ndarray x, cnp.ndarray out, int kind, bint wide, int n_threads):
    """out = the activation `kind` (0 relu, 1 relu6, 2 sigmoid, 3 tanh, 4 elu) of x,
    elementwise; float16 in float32, rounded once.  relu(-0.0) is +0.0 in float32 and
    float64, -0.0 in float16, as in TF.  C-contiguous arrays of one dtype and size:
    float32, float64, or float16 where f16c_enabled(); out may be x.  `wide`: in the
    AVX-512 loops (only where wide_enabled())."""
    _check_wide(wide)
    cdef int t = _activation_operands(x, "x", x, "x", out, kind)
    cdef const char* xp = <const char*>cnp.PyArray_DATA(x)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    with nogil:
        _activation_pieces(NULL, xp, op, n, kind, t, wide, n_threads)


def activation_grad(cnp.ndarray dy, cnp.ndarray y, cnp.ndarray out, int kind, int n_threads):
    """out = the gradient through activation `kind` (0 relu, 1 relu6, 2 sigmoid, 3 tanh,
    4 elu) given the output gradient dy and the activation's output y, elementwise, as
    TF's ReluGrad ... EluGrad; float16 in float32, rounded once.  C-contiguous arrays
    of one dtype and size: float32, float64, or float16 where f16c_enabled(); out may
    be dy or y."""
    cdef int t = _activation_operands(dy, "dy", y, "y", out, kind)
    cdef const char* dp = <const char*>cnp.PyArray_DATA(dy)
    cdef const char* yp = <const char*>cnp.PyArray_DATA(y)
    cdef char* op = <char*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(dy)
    with nogil:
        _activation_pieces(dp, yp, op, n, kind, t, False, n_threads)


def moments(cnp.ndarray x, object weights, int n_threads):
    """Per-channel (mean, biased variance), float64, of a C-contiguous (N, C, M) array.

    `weights`: None, or an array of x's dtype broadcast to x's shape (strides in whole
    elements, zero where broadcast), non-negative.  float16 x where f16c_enabled(),
    without weights: the statistics of its float32 values (the same bits), widened block
    by block.
    """
    cdef bint half = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16 and fastbn_have_f16c()
    if half and weights is not None:
        raise TypeError("weights need x of float32 or float64")
    cdef bint f32 = half or _is_float32(x)
    _require(x, cnp.PyArray_TYPE(x), "x", 3)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    cdef Geometry g = _geometry(N, C, M)
    cdef cnp.ndarray out_mean = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray out_var = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    if N * C * M == 0:
        out_mean[:] = np.nan
        out_var[:] = np.nan
        return out_mean, out_var
    cdef void* wt = NULL
    cdef Py_ssize_t ws_n = 0, ws_c = 0, ws_m = 0
    cdef cnp.ndarray warr
    if weights is not None:
        warr = weights
        if cnp.PyArray_TYPE(warr) != cnp.PyArray_TYPE(x) or warr.ndim != 3:
            raise TypeError("weights must be a 3-D array of x's dtype")
        wt = cnp.PyArray_DATA(warr)
        ws_n = warr.strides[0] // warr.itemsize
        ws_c = warr.strides[1] // warr.itemsize
        ws_m = warr.strides[2] // warr.itemsize
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef double* om = <double*>cnp.PyArray_DATA(out_mean)
    cdef double* ov = <double*>cnp.PyArray_DATA(out_var)
    cdef double* work = _workspace(&g)
    cdef Py_ssize_t size = g.blocks_per_channel * C
    with nogil:
        if half:
            _stats(<const float*>NULL, &g, <const float*>NULL, 0, 0, 0, n_threads, work,
                   work + size, work + 2 * size, om, ov, <const unsigned short*>xp)
        elif f32:
            _stats(<const float*>xp, &g, <const float*>wt, ws_n, ws_c, ws_m, n_threads,
                   work, work + size, work + 2 * size, om, ov)
        else:
            _stats(<const double*>xp, &g, <const double*>wt, ws_n, ws_c, ws_m, n_threads,
                   work, work + size, work + 2 * size, om, ov)
    free(work)
    return out_mean, out_var


cdef inline bint _check_after(int after, bint wide, bint stream) except -1:
    """Whether to stream the output, given the activation `after` the normalization."""
    if after < -1 or after > 4:
        raise ValueError(f"after must be -1 (none) or an activation, 0 to 4, got {after}")
    _check_wide(wide)
    # (The activation reads back what the normalization wrote: it has to be cached.)
    return stream and after < 0


def normalize(cnp.ndarray x, cnp.ndarray out, cnp.ndarray mean, cnp.ndarray k, cnp.ndarray b,
              bint relu, bint stream, int n_threads, *, int after=-1, bint wide=False):
    """out = (x - mean) * k + b per channel (then max(out, 0) if relu); out may be x.

    All arrays C-contiguous of x's dtype; x and out (N, C, M), the rest length C.
    `stream`: write out with non-temporal stores (for outputs larger than the cache).
    float16 x and out where f16c_enabled(), with float32 mean, k and b: as for
    float32 data, rounded once, stored plainly.  `after` (-1 for none): the activation
    of that kind (as for activation) of each piece of out as it is written, with the
    bits the activation of the whole gives (`wide` as there); out is then not streamed.
    """
    stream = _check_after(after, wide, stream)
    cdef int t = cnp.PyArray_TYPE(x)
    cdef bint half = t == cnp.NPY_FLOAT16 and fastbn_have_f16c()
    cdef bint f32 = half or _is_float32(x)
    cdef int ct = cnp.NPY_FLOAT32 if half else t
    for a, what, at, nd in ((x, "x", t, 3), (out, "out", t, 3), (mean, "mean", ct, 1),
                            (k, "k", ct, 1), (b, "b", ct, 1)):
        _require(a, at, what, nd)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if out.shape[0] != N or out.shape[1] != C or out.shape[2] != M or mean.shape[0] != C \
            or k.shape[0] != C or b.shape[0] != C:
        raise ValueError("normalize: shapes do not match")
    cdef Geometry g = _geometry(N, C, M)
    if N * C * M == 0:
        return
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* yp = cnp.PyArray_DATA(out)
    cdef void* mp = cnp.PyArray_DATA(mean)
    cdef void* kp = cnp.PyArray_DATA(k)
    cdef void* bp = cnp.PyArray_DATA(b)
    with nogil:
        if half:
            _affine(<const float*>NULL, <const float*>NULL, <float*>NULL, &g,
                    <const float*>mp, <const float*>kp, <const float*>bp, <const float*>NULL,
                    <const float*>NULL, 0, 0, relu, False, n_threads,
                    <const unsigned short*>xp, NULL, <unsigned short*>yp, after, wide)
        elif f32:
            _affine(<const float*>xp, <const float*>NULL, <float*>yp, &g, <const float*>mp,
                    <const float*>kp, <const float*>bp, <const float*>NULL, <const float*>NULL,
                    0, 0, relu, stream, n_threads, NULL, NULL, NULL, after, wide)
        else:
            _affine(<const double*>xp, <const double*>NULL, <double*>yp, &g,
                    <const double*>mp, <const double*>kp, <const double*>bp,
                    <const double*>NULL, <const double*>NULL, 0, 0, relu, stream, n_threads,
                    NULL, NULL, NULL, after, wide)


cdef inline bint _channelwise(Geometry* g, Py_ssize_t bytes_per_element, int nt,
                              Py_ssize_t min_run_bytes) noexcept nogil:
    """Whether to go channel by channel: runs layout, runs of at least min_run_bytes,
    channels that fit in L2, enough of them."""
    return (g.M > 1 and g.M * bytes_per_element >= min_run_bytes
            and g.N * g.M * bytes_per_element <= CHANNELWISE_BYTES
            and (nt <= 1 or g.C >= 2 * nt))


cdef void _train_channelwise(const floating* x, floating* y, Geometry* g,
                             const floating* scale, const floating* offset, double epsilon,
                             bint relu, bint stream, int nt, double* om, double* ov,
                             const unsigned short* x_halves=NULL,
                             unsigned short* y_halves=NULL, int after=-1,
                             bint wide=False) noexcept nogil:
    """Statistics then normalisation, one channel at a time per thread; of float16 data
    x_halves, y_halves where given (floating float, F16C builds, not streamed); then the
    activation `after` of each run written (see _after)."""
    cdef Py_ssize_t c, blk, r, i
    cdef double count, mean, m2, tot, na, n, delta
    cdef floating mc, kc, bc
    with parallel(num_threads=nt):
        for c in prange(g.C, schedule="static"):
            tot = 0.0
            # Assigned here, not only through pointers, so that Cython makes them private
            # to each thread (left shared, threads overwrite each other's block results).
            count = 0.0
            mean = 0.0
            m2 = 0.0
            for blk in range(g.blocks_per_channel):
                _runs_block(x, g, c, blk, &count, &mean, &m2, x_halves)
                # _merge's arithmetic, for this channel alone.
                if blk == 0:
                    tot = count
                    om[c] = mean
                    ov[c] = m2
                else:
                    na = tot
                    n = na + count
                    delta = mean - om[c]
                    om[c] = om[c] + delta * (count / n)
                    ov[c] = ov[c] + m2 + delta * delta * (na * count / n)
                    tot = n
            ov[c] = ov[c] / tot
            mc = <floating>om[c]
            kc = <floating>(<double>scale[c] / sqrt(ov[c] + epsilon))
            bc = <floating>offset[c]
            for r in range(g.N):
                i = (r * g.C + c) * g.M
                if floating is float and x_halves != NULL:
                    _halves_row(x_halves + i, NULL, y_halves + i, g.M, &mc, &kc, &bc, NULL,
                                False, relu)
                else:
                    _affine_run_out(x + i, <const floating*>NULL, y + i, g.M, mc, kc, bc, 0,
                                    <const floating*>NULL, 0, relu, stream)
                _after(y, y_halves, i, i + g.M, after, wide)
        if stream:
            fastbn_stream_fence()


cdef void _train(floating* tag, const floating* x, floating* y, Geometry* g,
                 const floating* scale, const floating* offset, double epsilon, bint relu,
                 bint stream, int n_threads, double* work, double* om, double* ov,
                 const unsigned short* x_halves=NULL, unsigned short* y_halves=NULL,
                 int after=-1, bint wide=False) noexcept nogil:
    """Statistics and the normalization with them; of float16 data x_halves, y_halves
    where given (x and y NULL, floating float, F16C builds, not streamed); `after` as
    for _affine."""
    cdef Py_ssize_t C = g.C, size = g.blocks_per_channel * C, c
    cdef int nt = _threads(g.N * g.C * g.M, n_threads)
    # (float16 runs shorter than CHANNELWISE_RUN_BYTES normalize faster in _affine's
    # items of several runs: NCHW 7x7 and 14x14 training 6-10%, measured.)
    if _channelwise(g, 2 if x_halves != NULL else sizeof(floating), nt,
                    CHANNELWISE_RUN_BYTES if x_halves != NULL else 0):
        _train_channelwise(x, y, g, scale, offset, epsilon, relu, stream, nt, om, ov,
                           x_halves, y_halves, after, wide)
        return
    _stats(x, g, <const floating*>NULL, 0, 0, 0, n_threads, work, work + size, work + 2 * size,
           om, ov, x_halves)
    # The per-channel vectors in the data type reuse the start of the workspace.
    cdef floating* mv = <floating*>work
    cdef floating* kv = mv + C
    cdef floating* bv = kv + C
    # One output per loop, so that each vectorises (see _backward).
    for c in range(C):
        mv[c] = <floating>om[c]
    for c in range(C):
        kv[c] = <floating>(<double>scale[c] / sqrt(ov[c] + epsilon))
    for c in range(C):
        bv[c] = offset[c]
    _affine(x, <const floating*>NULL, y, g, mv, kv, bv, <const floating*>NULL,
            <const floating*>NULL, 0, 0, relu, stream, n_threads, x_halves, NULL, y_halves,
            after, wide)


cdef void _multipliers(const double* variance, const double* scale, double epsilon,
                       Py_ssize_t C, floating* kv) noexcept nogil:
    """kv = scale / sqrt(variance + epsilon) per channel: per_channel_multiplier's
    arithmetic (fastbn/backends/base.py), in float64; scale NULL for 1."""
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = 1.0 / sqrt(variance[c] + epsilon)
        if scale != NULL:
            inv = inv * scale[c]
        kv[c] = <floating>inv


cdef void _infer(const floating* x, floating* y, Geometry* g, const floating* mean,
                 const double* variance, const double* scale, const floating* offset,
                 double epsilon, bint relu, bint stream, int n_threads, floating* kv,
                 const unsigned short* x_halves=NULL, unsigned short* y_halves=NULL,
                 int after=-1, bint wide=False) noexcept nogil:
    """The multipliers, then the normalization; of float16 data x_halves, y_halves where
    given (x and y NULL, floating float, F16C builds, not streamed); `after` as for
    _affine."""
    _multipliers(variance, scale, epsilon, g.C, kv)
    _affine(x, <const floating*>NULL, y, g, mean, kv, offset, <const floating*>NULL,
            <const floating*>NULL, 0, 0, relu, stream, n_threads, x_halves, NULL, y_halves,
            after, wide)


def infer_forward(cnp.ndarray x, cnp.ndarray out, cnp.ndarray mean, cnp.ndarray variance,
                  object scale, cnp.ndarray offset, double epsilon, bint relu, bint stream,
                  int n_threads, *, int after=-1, bint wide=False):
    """out = (x - mean) * scale / sqrt(variance + epsilon) + offset per channel (then
    max(out, 0) if relu): inference with given statistics; out may be x.  `after`,
    `wide`: as for normalize.

    x and out: C-contiguous (N, C, M) of one dtype; mean and offset: vectors of the
    compute dtype; variance and scale (or None for 1): vectors of the compute dtype or
    float64.  `stream`: as for normalize.  float16 x and out where f16c_enabled():
    computed in float32 as for float32 data and rounded once, stored plainly; the
    compute dtype is float32 for them.
    """
    stream = _check_after(after, wide, stream)
    cdef int t = cnp.PyArray_TYPE(x)
    cdef bint half = t == cnp.NPY_FLOAT16 and fastbn_have_f16c()
    cdef bint f32 = half or _is_float32(x)
    cdef int ct = cnp.NPY_FLOAT32 if half else t
    _require(x, t, "x", 3)
    _require(out, t, "out", 3)
    _require(mean, ct, "mean", 1)
    _require(offset, ct, "offset", 1)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if out.shape[0] != N or out.shape[1] != C or out.shape[2] != M or mean.shape[0] != C \
            or offset.shape[0] != C:
        raise ValueError("infer_forward: shapes do not match")
    _check_vector(variance, ct, C, "variance")
    if scale is not None:
        _check_vector(scale, ct, C, "scale")
    if N * C * M == 0:
        return
    # The multipliers in the data type, then room for variance and scale as doubles.
    cdef double* kv = <double*>malloc(3 * C * sizeof(double) + 8)
    if kv == NULL:
        raise MemoryError()
    cdef const double* vp = _doubles(variance, kv + C)
    cdef const double* sp = NULL if scale is None else _doubles(scale, kv + 2 * C)
    cdef Geometry g = _geometry(N, C, M)
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* yp = cnp.PyArray_DATA(out)
    cdef void* mp = cnp.PyArray_DATA(mean)
    cdef void* op = cnp.PyArray_DATA(offset)
    with nogil:
        if half:
            _infer(<const float*>NULL, <float*>NULL, &g, <const float*>mp, vp, sp,
                   <const float*>op, epsilon, relu, False, n_threads, <float*>kv,
                   <const unsigned short*>xp, <unsigned short*>yp, after, wide)
        elif f32:
            _infer(<const float*>xp, <float*>yp, &g, <const float*>mp, vp, sp,
                   <const float*>op, epsilon, relu, stream, n_threads, <float*>kv, NULL, NULL,
                   after, wide)
        else:
            _infer(<const double*>xp, <double*>yp, &g, <const double*>mp, vp, sp,
                   <const double*>op, epsilon, relu, stream, n_threads, <double*>kv, NULL,
                   NULL, after, wide)
    free(kv)


def train_forward(cnp.ndarray x, cnp.ndarray out, cnp.ndarray scale, cnp.ndarray offset,
                  double epsilon, bint relu, bint stream, int n_threads, *, int after=-1,
                  bint wide=False):
    """Batch statistics, then out = normalized x; returns (mean, biased variance), float64.

    x and out: C-contiguous (N, C, M) of one dtype, N*C*M > 0 (out may be x); scale and
    offset: C-contiguous vectors of length C in that dtype.  `stream`, `after`, `wide`: as
    for normalize.  float16 x and out where f16c_enabled(), with float32 scale and
    offset: the float32 arithmetic on their values, rounded once (stored plainly).
    """
    stream = _check_after(after, wide, stream)
    cdef int t = cnp.PyArray_TYPE(x)
    cdef bint half = t == cnp.NPY_FLOAT16 and fastbn_have_f16c()
    cdef bint f32 = half or _is_float32(x)
    cdef int ct = cnp.NPY_FLOAT32 if half else t
    _require(x, t, "x", 3)
    _require(out, t, "out", 3)
    _require(scale, ct, "scale", 1)
    _require(offset, ct, "offset", 1)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if out.shape[0] != N or out.shape[1] != C or out.shape[2] != M or scale.shape[0] != C \
            or offset.shape[0] != C:
        raise ValueError("train_forward: shapes do not match")
    if N * C * M == 0:
        raise ValueError("train_forward: no elements to compute statistics from")
    cdef Geometry g = _geometry(N, C, M)
    cdef cnp.ndarray out_mean = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray out_var = cnp.PyArray_EMPTY(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* yp = cnp.PyArray_DATA(out)
    cdef void* sp = cnp.PyArray_DATA(scale)
    cdef void* op = cnp.PyArray_DATA(offset)
    cdef double* om = <double*>cnp.PyArray_DATA(out_mean)
    cdef double* ov = <double*>cnp.PyArray_DATA(out_var)
    cdef double* work = _workspace(&g)
    with nogil:
        if half:
            _train(<float*>NULL, <const float*>NULL, <float*>NULL, &g, <const float*>sp,
                   <const float*>op, epsilon, relu, False, n_threads, work, om, ov,
                   <const unsigned short*>xp, <unsigned short*>yp, after, wide)
        elif f32:
            _train(<float*>NULL, <const float*>xp, <float*>yp, &g, <const float*>sp,
                   <const float*>op, epsilon, relu, stream, n_threads, work, om, ov, NULL,
                   NULL, after, wide)
        else:
            _train(<double*>NULL, <const double*>xp, <double*>yp, &g, <const double*>sp,
                   <const double*>op, epsilon, relu, stream, n_threads, work, om, ov, NULL,
                   NULL, after, wide)
    free(work)
    return out_mean, out_var


def grad_reductions(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray mean, int n_threads):
    """Per-channel (sum(dy), sum(dy * (x - mean))), float64, for the gradient.

    x and dy: C-contiguous (N, C, M) of one dtype; mean: float64 vector of length C.
    """
    cdef bint f32 = _is_float32(x)
    cdef int t = cnp.PyArray_TYPE(x)
    _require(x, t, "x", 3)
    _require(dy, t, "dy", 3)
    _require(mean, cnp.NPY_FLOAT64, "mean", 1)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if dy.shape[0] != N or dy.shape[1] != C or dy.shape[2] != M or mean.shape[0] != C:
        raise ValueError("grad_reductions: shapes do not match")
    cdef Geometry g = _geometry(N, C, M)
    cdef cnp.ndarray out1 = cnp.PyArray_ZEROS(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray out2 = cnp.PyArray_ZEROS(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    if N * C * M == 0:
        return out1, out2
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* gp = cnp.PyArray_DATA(dy)
    cdef const double* mp = <const double*>cnp.PyArray_DATA(mean)
    cdef double* o1 = <double*>cnp.PyArray_DATA(out1)
    cdef double* o2 = <double*>cnp.PyArray_DATA(out2)
    cdef double* work = _workspace(&g)
    cdef Py_ssize_t size = g.blocks_per_channel * C
    with nogil:
        if f32:
            _grad_sums(<const float*>xp, <const float*>gp, &g, mp, n_threads, work, work + size,
                       o1, o2)
        else:
            _grad_sums(<const double*>xp, <const double*>gp, &g, mp, n_threads, work,
                       work + size, o1, o2)
    free(work)
    return out1, out2


def grad_input(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray out, cnp.ndarray mean, cnp.ndarray a,
               cnp.ndarray b, cnp.ndarray c, object weights, bint stream, int n_threads):
    """out = a * dy + w * (b * (x - mean) + c) per channel (w: weights, or 1).

    x, dy, out: C-contiguous (N, C, M) of one dtype (out may be dy or x); mean, a, b, c:
    vectors of that dtype; weights: None or an (N, 1, M) array of that dtype.
    `stream`: as for normalize.
    """
    cdef bint f32 = _is_float32(x)
    cdef int t = cnp.PyArray_TYPE(x)
    for arr, what, nd in ((x, "x", 3), (dy, "dy", 3), (out, "out", 3), (mean, "mean", 1),
                          (a, "a", 1), (b, "b", 1), (c, "c", 1)):
        _require(arr, t, what, nd)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if dy.shape[0] != N or dy.shape[1] != C or dy.shape[2] != M or out.shape[0] != N \
            or out.shape[1] != C or out.shape[2] != M or mean.shape[0] != C \
            or a.shape[0] != C or b.shape[0] != C or c.shape[0] != C:
        raise ValueError("grad_input: shapes do not match")
    cdef void* wt = NULL
    cdef Py_ssize_t ws_n = 0, ws_m = 0
    cdef cnp.ndarray warr
    if weights is not None:
        warr = weights
        if cnp.PyArray_TYPE(warr) != t or warr.ndim != 3 or warr.shape[0] != N \
                or warr.shape[1] != 1 or warr.shape[2] != M:
            raise TypeError("weights must be an (N, 1, M) array of x's dtype")
        wt = cnp.PyArray_DATA(warr)
        ws_n = warr.strides[0] // warr.itemsize
        ws_m = warr.strides[2] // warr.itemsize
    if N * C * M == 0:
        return
    cdef Geometry g = _geometry(N, C, M)
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* gp = cnp.PyArray_DATA(dy)
    cdef void* op = cnp.PyArray_DATA(out)
    cdef void* mp = cnp.PyArray_DATA(mean)
    cdef void* ap = cnp.PyArray_DATA(a)
    cdef void* bp = cnp.PyArray_DATA(b)
    cdef void* cp = cnp.PyArray_DATA(c)
    with nogil:
        if f32:
            _affine(<const float*>xp, <const float*>gp, <float*>op, &g, <const float*>mp,
                    <const float*>bp, <const float*>cp, <const float*>ap, <const float*>wt,
                    ws_n, ws_m, False, stream, n_threads)
        else:
            _affine(<const double*>xp, <const double*>gp, <double*>op, &g, <const double*>mp,
                    <const double*>bp, <const double*>cp, <const double*>ap,
                    <const double*>wt, ws_n, ws_m, False, stream, n_threads)


cdef void _backward_channelwise(const floating* x, const floating* dy, floating* dx,
                                Geometry* g, const double* mean, const double* variance,
                                const double* scale, double epsilon, bint training,
                                const floating* wt, Py_ssize_t ws_n, Py_ssize_t ws_m,
                                double total, bint stream, int nt, double* sum_dy,
                                double* sum_dy_xhat, const unsigned short* x_halves=NULL,
                                const unsigned short* dy_halves=NULL,
                                unsigned short* dx_halves=NULL) noexcept nogil:
    """_grad_sums then the input gradient, one channel at a time per thread; of float16
    data x_halves, dy_halves, dx_halves where given (floating float, F16C builds, no
    weights, not streamed)."""
    cdef Py_ssize_t c, blk, n, i, M = g.M, C = g.C
    cdef double s1, s2, t1, t2, inv, k
    cdef floating centre, ac, bc, cc
    with parallel(num_threads=nt):
        for c in prange(C, schedule="static"):
            centre = <floating>mean[c]
            t1 = 0.0
            t2 = 0.0
            for blk in range(g.blocks_per_channel):
                # Assigned here, not only through pointers, so that Cython makes them
                # private to each thread.
                s1 = 0.0
                s2 = 0.0
                _grad_runs_block(x, dy, g, c, blk, mean, &s1, &s2, x_halves, dy_halves)
                # _grad_sums' arithmetic, for this channel alone.
                if blk == 0:
                    t1 = s1
                    t2 = s2
                else:
                    t1 = t1 + s1
                    t2 = t2 + s2
            inv = 1.0 / sqrt(variance[c] + epsilon)
            sum_dy[c] = t1
            sum_dy_xhat[c] = t2 * inv
            k = scale[c] * inv
            ac = <floating>k
            if training and total != 0.0:
                bc = <floating>(-k * inv * sum_dy_xhat[c] / total)
                cc = <floating>(-k * t1 / total)
            else:
                bc = 0
                cc = 0
            for n in range(g.N):
                i = (n * C + c) * M
                if floating is float and x_halves != NULL:
                    _halves_row(x_halves + i, dy_halves + i, dx_halves + i, M, &centre, &bc,
                                &cc, &ac, False, False)
                else:
                    _affine_run_out(x + i, dy + i, dx + i, M, centre, bc, cc, ac,
                                    _offset(wt, n * ws_n), ws_m, False, stream)
        if stream:
            fastbn_stream_fence()


cdef void _backward(floating* coefficients, const floating* x, const floating* dy, floating* dx,
                    Geometry* g, const double* mean, const double* variance,
                    const double* scale, double epsilon, bint training, const floating* wt,
                    Py_ssize_t ws_n, Py_ssize_t ws_m, double total, bint stream,
                    int n_threads, double* work, double* sum_dy, double* sum_dy_xhat,
                    const unsigned short* x_halves=NULL, const unsigned short* dy_halves=NULL,
                    unsigned short* dx_halves=NULL) noexcept nogil:
    """The gradient sums, then dx; of float16 data x_halves, dy_halves, dx_halves where
    given (x, dy and dx NULL, floating float, F16C builds, no weights, not streamed):
    the float32 kernels' bits on the same values, dx rounded once.  `coefficients`: room
    for 4 * C values (its type picks the kernels)."""
    cdef Py_ssize_t C = g.C, size = g.blocks_per_channel * C
    cdef int nt = _threads(g.N * g.C * g.M, n_threads)
    cdef bint halves = x_halves != NULL
    # (The input gradient of runs shorter than CHANNELWISE_RUN_BYTES (float16: twice
    # that) goes faster in _affine's items of several runs: NCHW 7x7 float32 16%, float16
    # 7x7 and 14x14, measured.)
    if _channelwise(g, 4 if halves else 2 * sizeof(floating), nt,
                    2 * CHANNELWISE_RUN_BYTES if halves else CHANNELWISE_RUN_BYTES):
        _backward_channelwise(x, dy, dx, g, mean, variance, scale, epsilon, training, wt, ws_n,
                              ws_m, total, stream, nt, sum_dy, sum_dy_xhat, x_halves,
                              dy_halves, dx_halves)
        return
    # The sums, their merge with the coefficients, and dx in one parallel block: the
    # merge and the coefficients (a square root and three divisions a channel: 14 us of
    # 4096 channels on one thread) are shared out by channel instead of run on one
    # thread while the others wait, and one block costs one start instead of two.
    cdef Py_ssize_t wrap = _wrap(g, wt)
    cdef floating* ext = NULL
    cdef void* ext_block = NULL
    if wrap:
        ext = _wrapped_room(C + wrap, x, &ext_block)
        if ext == NULL:
            wrap = 0
    cdef Py_ssize_t n_items = _affine_items(g, ext != NULL)
    if nt == 1:
        _backward_share(x, dy, dx, g, mean, variance, scale, epsilon, training, wt, ws_n, ws_m,
                        total, stream, work, work + size, sum_dy, sum_dy_xhat, coefficients,
                        ext, wrap, n_items, x_halves, dy_halves, dx_halves)
    else:
        with parallel(num_threads=nt):
            _backward_share(x, dy, dx, g, mean, variance, scale, epsilon, training, wt, ws_n,
                            ws_m, total, stream, work, work + size, sum_dy, sum_dy_xhat,
                            coefficients, ext, wrap, n_items, x_halves, dy_halves,
                            dx_halves)
    free(ext_block)


cdef void _backward_share(const floating* x, const floating* dy, floating* dx, Geometry* g,
                          const double* mean, const double* variance, const double* scale,
                          double epsilon, bint training, const floating* wt, Py_ssize_t ws_n,
                          Py_ssize_t ws_m, double total, bint stream, double* part1,
                          double* part2, double* sum_dy, double* sum_dy_xhat,
                          floating* mv, floating* ext, Py_ssize_t wrap, Py_ssize_t n_items,
                          const unsigned short* x_halves, const unsigned short* dy_halves,
                          unsigned short* dx_halves) noexcept nogil:
    """The calling thread's part of _backward's blocks (all of it outside a parallel
    block): its share of the sums' blocks; then of the channels, merged and made into
    the coefficients mv (mean, a, b, c: 4 * C values) and, where `ext` is given, into
    their wrapped copies; then of the items of dx."""
    cdef Py_ssize_t C = g.C, lo, hi
    cdef int v
    _grad_share(x, dy, g, mean, part1, part2, x_halves, dy_halves)
    fastbn_barrier()
    lo = _share_end(C, 0)
    hi = _share_end(C, 1)
    _grad_merge(g, part1, part2, sum_dy, sum_dy_xhat, lo, hi)
    _grad_coefficients(lo, hi, C, mean, variance, scale, epsilon, training, total, sum_dy,
                       sum_dy_xhat, mv)
    if ext != NULL:
        fastbn_barrier()
        v = fastbn_thread_num()
        while v < 4:
            _wrapped_parameter(ext, C + wrap, v, mv, mv + 2 * C, mv + 3 * C, mv + C, C)
            v += fastbn_team_size()
    fastbn_barrier()
    _affine_share(x, dy, dx, g, mv, mv + 2 * C, mv + 3 * C, mv + C, wt, ws_n, ws_m, False,
                  stream, ext, wrap, n_items, x_halves, dy_halves, dx_halves, -1, False)


cdef void _grad_coefficients(Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t C, const double* mean,
                             const double* variance, const double* scale, double epsilon,
                             bint training, double total, const double* sum_dy,
                             double* sum_dy_xhat, floating* mv) noexcept nogil:
    """The coefficients of dx = a * dy + w * (b * (x - mean) + c) of channels lo..hi, in
    the data type: mean, a, b and c, C values each, one after another from mv;
    sum_dy_xhat (the sum of dy * (x - mean)) is scaled to the sum of dy * x_hat on the
    way."""
    cdef Py_ssize_t c0, w, j
    cdef double inv[CHANNEL_TILE]
    cdef double k[CHANNEL_TILE]
    cdef floating* av = mv + C
    cdef floating* bv = av + C
    cdef floating* cv = bv + C
    # A tile of channels at a time, one output per loop: loops the compiler can see
    # alias nothing, so they vectorise (thousands of channels cost microseconds each).
    c0 = lo
    while c0 < hi:
        w = hi - c0 if hi - c0 < CHANNEL_TILE else CHANNEL_TILE
        for j in range(w):
            inv[j] = 1.0 / sqrt(variance[c0 + j] + epsilon)
        for j in range(w):
            k[j] = scale[c0 + j] * inv[j]
        for j in range(w):
            sum_dy_xhat[c0 + j] = sum_dy_xhat[c0 + j] * inv[j]
        for j in range(w):
            mv[c0 + j] = <floating>mean[c0 + j]
        for j in range(w):
            av[c0 + j] = <floating>k[j]
        if training and total != 0.0:
            for j in range(w):
                bv[c0 + j] = <floating>(-k[j] * inv[j] * sum_dy_xhat[c0 + j] / total)
            for j in range(w):
                cv[c0 + j] = <floating>(-k[j] * sum_dy[c0 + j] / total)
        else:
            for j in range(w):
                bv[c0 + j] = 0
                cv[c0 + j] = 0
        c0 += w


def backward(cnp.ndarray x, cnp.ndarray dy, cnp.ndarray out, cnp.ndarray mean,
             cnp.ndarray variance, cnp.ndarray scale, double epsilon, bint training,
             object weights, bint stream, int n_threads):
    """Fused input gradient: per-channel sums in one read of x and dy, then dx.

    x, dy, out: C-contiguous (N, C, M) of one dtype (out may be dy); mean, variance,
    scale: vectors of the compute dtype or float64; weights: None or (N, 1, M) of x's
    dtype; `stream`: as for normalize.  Returns (sum(dy), sum(dy * x_hat)) as float64
    vectors.  float16 x, dy and out where f16c_enabled(), without weights: the float32
    arithmetic on their values, dx rounded once (stored plainly); the compute dtype is
    float32 for them.
    """
    cdef int t = cnp.PyArray_TYPE(x)
    cdef bint half = t == cnp.NPY_FLOAT16 and fastbn_have_f16c()
    if half and weights is not None:
        raise TypeError("weights need x of float32 or float64")
    cdef bint f32 = half or _is_float32(x)
    cdef int ct = cnp.NPY_FLOAT32 if half else t
    for arr, what in ((x, "x"), (dy, "dy"), (out, "out")):
        _require(arr, t, what, 3)
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], M = x.shape[2]
    if dy.shape[0] != N or dy.shape[1] != C or dy.shape[2] != M or out.shape[0] != N \
            or out.shape[1] != C or out.shape[2] != M:
        raise ValueError("backward: shapes do not match")
    for arr, what in ((mean, "mean"), (variance, "variance"), (scale, "scale")):
        _check_vector(arr, ct, C, what)
    cdef void* wt = NULL
    cdef Py_ssize_t ws_n = 0, ws_m = 0
    cdef double total = <double>(N * M)
    cdef cnp.ndarray warr
    if weights is not None:
        warr = weights
        if cnp.PyArray_TYPE(warr) != t or warr.ndim != 3 or warr.shape[0] != N \
                or warr.shape[1] != 1 or warr.shape[2] != M:
            raise TypeError("weights must be an (N, 1, M) array of x's dtype")
        wt = cnp.PyArray_DATA(warr)
        ws_n = warr.strides[0] // warr.itemsize
        ws_m = warr.strides[2] // warr.itemsize
        total = float(np.sum(warr, dtype=np.float64))
    cdef Geometry g = _geometry(N, C, M)
    cdef cnp.ndarray sum_dy = cnp.PyArray_ZEROS(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray sum_dy_xhat = cnp.PyArray_ZEROS(1, <cnp.npy_intp*>&g.C, cnp.NPY_FLOAT64, 0)
    if N * C * M == 0:
        return sum_dy, sum_dy_xhat
    cdef void* xp = cnp.PyArray_DATA(x)
    cdef void* gp = cnp.PyArray_DATA(dy)
    cdef void* op = cnp.PyArray_DATA(out)
    cdef double* s1 = <double*>cnp.PyArray_DATA(sum_dy)
    cdef double* s2 = <double*>cnp.PyArray_DATA(sum_dy_xhat)
    # The vectors as doubles after the workspace's blocks (see _workspace), then room for
    # the coefficients of dx (4 * C values of the compute dtype).
    cdef double* work = _workspace(&g, 7)
    cdef double* room = work + (3 * g.blocks_per_channel + 1) * C
    cdef const double* mp = _doubles(mean, room)
    cdef const double* vp = _doubles(variance, room + C)
    cdef const double* sp = _doubles(scale, room + 2 * C)
    with nogil:
        if half:
            _backward(<float*>(room + 3 * C), <const float*>NULL, <const float*>NULL,
                      <float*>NULL, &g, mp, vp, sp, epsilon, training, <const float*>NULL, 0,
                      0, total, False, n_threads, work, s1, s2, <const unsigned short*>xp,
                      <const unsigned short*>gp, <unsigned short*>op)
        elif f32:
            _backward(<float*>(room + 3 * C), <const float*>xp, <const float*>gp, <float*>op, &g,
                      mp, vp, sp, epsilon, training, <const float*>wt, ws_n, ws_m, total,
                      stream, n_threads, work, s1, s2)
        else:
            _backward(room + 3 * C, <const double*>xp, <const double*>gp, <double*>op, &g, mp,
                      vp, sp, epsilon, training, <const double*>wt, ws_n, ws_m, total,
                      stream, n_threads, work, s1, s2)
    free(work)
    return sum_dy, sum_dy_xhat
