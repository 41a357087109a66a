/* The memory traffic of the benchmarked ops, moved by plain C on OpenMP threads and
   nothing else: built and driven by memory_floor.py.

   Each thread takes a contiguous share of the n floats (whole lines of 16).  The
   optional first pass reads the share forwards (x, or x * d: the statistics or the
   gradient sums); the write pass then goes over it backwards (y = 1.5 x + 0.5, plus d
   where given), as fastbn's kernels do, so that it starts on what the first pass left
   in the core's cache.  `stream`: non-temporal stores (y 32-byte aligned).  `block` > 0:
   both passes go over the share a piece of that many floats at a time (rounded up to a
   line), the write pass right after the read pass of the same piece, as fastbn's kernels
   go channel by channel on NCHW (a contiguous piece: a floor for runs of a channel). */
#include <immintrin.h>
#include <omp.h>

static float sum_pass(const float *x, const float *d, long a, long b)
{
    /* Eight accumulators: loads, not the adds' latency, bound the loop. */
    __m256 s[8];
    float lanes[8], total = 0.0f;
    long i = a;
    int k;
    for (k = 0; k < 8; k++)
        s[k] = _mm256_setzero_ps();
    for (; i + 64 <= b; i += 64)
        for (k = 0; k < 8; k++) {
            __m256 v = _mm256_loadu_ps(x + i + 8 * k);
            s[k] = d ? _mm256_fmadd_ps(v, _mm256_loadu_ps(d + i + 8 * k), s[k])
                     : _mm256_add_ps(v, s[k]);
        }
    for (k = 1; k < 8; k++)
        s[0] = _mm256_add_ps(s[0], s[k]);
    _mm256_storeu_ps(lanes, s[0]);
    for (k = 0; k < 8; k++)
        total += lanes[k];
    for (; i < b; i++)
        total += d ? x[i] * d[i] : x[i];
    return total;
}

static void write_pass(float *y, const float *x, const float *d, long a, long b, int stream)
{
    const __m256 k = _mm256_set1_ps(1.5f), o = _mm256_set1_ps(0.5f);
    long i = a + (b - a) / 8 * 8, j;
    /* The ragged end first: the vectors then stay aligned with the share's start. */
    for (j = b - 1; j >= i; j--)
        y[j] = 1.5f * x[j] + 0.5f + (d ? d[j] : 0.0f);
    for (; i > a; i -= 8) {
        __m256 v = _mm256_fmadd_ps(_mm256_loadu_ps(x + i - 8), k, o);
        if (d)
            v = _mm256_add_ps(v, _mm256_loadu_ps(d + i - 8));
        if (stream)
            _mm256_stream_ps(y + i - 8, v);
        else
            _mm256_storeu_ps(y + i - 8, v);
    }
}

/* passes: 0 the write pass, 1 the first pass then the write pass. */
float floor_run(float *y, const float *x, const float *d, long n, int passes, int stream,
                int threads, long block)
{
    float sums[256] = {0};
    block = (block + 15) / 16 * 16;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        long a = n * t / team / 16 * 16;
        long b = t == team - 1 ? n : n * (t + 1) / team / 16 * 16;
        long step = block > 0 ? block : b - a, p, q;
        for (p = a; p < b; p = q) {
            q = b - p > step ? p + step : b;
            if (passes == 1)
                sums[t % 256] += sum_pass(x, d, p, q);
            write_pass(y, x, d, p, q, stream);
        }
        if (stream)
            _mm_sfence();
    }
    return sums[0];
}
