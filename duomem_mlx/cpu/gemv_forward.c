/* cblas_sgemm with one output row or column sent to cblas_sgemv; duomem_mlx/cpu/blas.py builds it and
   preloads it before OpenBLAS on a Linux CPU.

   MLX's CPU backend computes a Linear on one token (`x @ W.T`, M = 1) with cblas_sgemm. OpenBLAS
   runs that through its packing GEMM driver: on a 2-core EPYC, 0.3.21 (Debian bookworm) reads the
   weights at 8-12 GB/s where its own sgemv reads 25-38. Its GEMM-to-GEMV forwarding (0.3.28+) is
   built for ARM64, POWER and RISC-V only, never x86-64. Every other call goes on, unchanged, to
   the next cblas_sgemm in the link order (the preloaded OpenBLAS). */
#define _GNU_SOURCE
#include <dlfcn.h>

enum { RowMajor = 101, ColMajor = 102, NoTrans = 111, Trans = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

__attribute__((constructor)) static void resolve(void) {
  sgemv_fn gemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
  sgemm_fn gemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  next_sgemv = gemm ? gemv : 0; /* forward only where both come from the next library */
  next_sgemm = gemm;
}

/* The number of calls sent to sgemv, for tests (`duomem_mlx_gemv_forwarded`). */
static unsigned long forwarded;
unsigned long duomem_mlx_gemv_forwarded(void) { return __atomic_load_n(&forwarded, __ATOMIC_RELAXED); }

void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!next_sgemm) resolve();
  if (!next_sgemm) return;
  if (next_sgemv && (m == 1 || n == 1) && m > 0 && n > 0 && k > 0 &&
      (order == RowMajor || order == ColMajor)) {
    /* In column-major terms C (m x n) = op(A) (m x k) op(B) (k x n); a row-major call is the
       column-major product C^T = op(B)^T op(A)^T: swap m with n, A with B. */
    if (order == RowMajor) {
      int t = m; m = n; n = t;
      const float *p = a; a = b; b = p;
      t = lda; lda = ldb; ldb = t;
      t = transa; transa = transb; transb = t;
    }
    int ta = transa != NoTrans, tb = transb != NoTrans;
    __atomic_add_fetch(&forwarded, 1, __ATOMIC_RELAXED);
    if (n == 1) /* C's column (contiguous) = op(A) times op(B)'s column (stride 1, or ldb if B^T) */
      next_sgemv(ColMajor, ta ? Trans : NoTrans, ta ? k : m, ta ? m : k, alpha, a, lda, b, tb ? ldb : 1,
                 beta, c, 1);
    else /* C's row (stride ldc) = op(B)^T times op(A)'s row (stride lda, or 1 if A^T) */
      next_sgemv(ColMajor, tb ? NoTrans : Trans, tb ? n : k, tb ? k : n, alpha, b, ldb, a, ta ? 1 : lda,
                 beta, c, ldc);
    return;
  }
  next_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
