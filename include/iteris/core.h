/* iteris-mpi core: error codes, error messages with traceback, logging, checked allocation,
 * dtypes and their conversions, timers. Not Collective anywhere: this layer never calls MPI
 * collectives and never opens files.
 *
 * Shape vocabulary, used across the code base (comments give shapes in these words):
 *   L   number of decoder layers            N   number of adapters (tasks)
 *   r_i rank of adapter i                   R   sum_i r_i (rank of the exact merged LoRA)
 *   T   tokens (rows of an activation block)
 *   D   model width (hidden_size)           F   FFN width (intermediate_size)
 *   d_out x d_in   a projection's weight, applied as y = x W^T to row vectors x (HF convention)
 * Distributed sizes use ScaLAPACK's words (m_loc, mb, lld, nprow, myrow); MPI locals are rank, size.
 * Storage is row-major, outermost first, as in safetensors; ScaLAPACK's column-major blocks are
 * entered and left only in src/dist. */
#ifndef ITERIS_CORE_H
#define ITERIS_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- errors ------------------------------------------------------------------------------- */

/* Every fallible function returns one of these. The value is also the process exit code
 * (see itr_exit_code). */
typedef enum {
  ITR_OK = 0,
  ITR_ERR_INPUT = 2,    /* bad usage or bad input file: the user can fix it          */
  ITR_ERR_NUMERIC = 3,  /* a numerical failure (matrix not SPD, NaN in a solve, ...) */
  ITR_ERR_INTERNAL = 4, /* a bug, or the system failed us (out of memory, disk full) */
  ITR_ERR_INTERRUPTED = 5, /* stopped by a signal after saving a checkpoint: rerun with -restart 1 */
} itr_err;

/* Records an error message (printf-style) for the calling thread and returns code.
 * Replaces any earlier message. */
itr_err itr_error_set(itr_err code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends a traceback frame "  in func (file:line)" to the current message; returns code. */
itr_err itr_error_frame(itr_err code, const char *func, const char *file, int line);
/* The current message ("" when none); valid until the next itr_error_* call of this thread. */
const char *itr_error_message(void);
/* The message without traceback frames: the first line. Copies into buf (always terminated). */
void itr_error_headline(char *buf, size_t len);
void itr_error_clear(void);
/* Process exit code for an error: 0, 2 (usage/input), 3 (numerical), 4 (internal),
 * 5 (interrupted by a signal after a checkpoint). */
int itr_exit_code(itr_err code);
const char *itr_err_name(itr_err code);

/* Input check, always on: if cond is false, set the message and return code from the function. */
#define ITR_CHECK(cond, code, ...)                         \
  do {                                                      \
    if (!(cond)) return itr_error_set((code), __VA_ARGS__); \
  } while (0)
/* Propagate an error from a callee, adding a traceback frame. */
#define ITR_TRY(expr)                                                                \
  do {                                                                               \
    itr_err itr_try_e_ = (expr);                                                     \
    if (itr_try_e_ != ITR_OK) return itr_error_frame(itr_try_e_, __func__, __FILE__, __LINE__); \
  } while (0)
/* Same, but jump to a cleanup label with the error stored in variable err. */
#define ITR_TRY_GOTO(expr, err, label)                                          \
  do {                                                                          \
    (err) = (expr);                                                             \
    if ((err) != ITR_OK) {                                                      \
      itr_error_frame((err), __func__, __FILE__, __LINE__);                     \
      goto label;                                                               \
    }                                                                           \
  } while (0)
/* Internal invariant, debug builds only; never use on input. */
#ifdef NDEBUG
#define ITR_ASSERT(cond) ((void)0)
#else
#include <assert.h>
#define ITR_ASSERT(cond) assert(cond)
#endif

/* ---- logging ------------------------------------------------------------------------------ */

typedef enum { ITR_LOG_ERROR = 0, ITR_LOG_WARN = 1, ITR_LOG_INFO = 2, ITR_LOG_DEBUG = 3 } itr_log_level;
/* Messages above this level are dropped (default INFO). */
void itr_log_set_level(itr_log_level level);
/* Label printed before every line, e.g. "[rank 1/4 job 123.0]"; set by the dist layer. */
void itr_log_set_label(const char *label);
/* Only this process prints INFO/DEBUG when quiet is set (the dist layer sets it on ranks != 0). */
void itr_log_set_quiet(int quiet);
void itr_log(itr_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ---- checked allocation ------------------------------------------------------------------- */

/* *out = zeroed array of n elements of size bytes; checks n*size for overflow. Sets an
 * ITR_ERR_INTERNAL message naming what (e.g. "gram of layers.3.q_proj") on failure. */
itr_err itr_calloc(size_t n, size_t size, const char *what, void *out);
/* Fault injection for tests: the k-th allocation from now fails (k >= 1); 0 disables. */
void itr_alloc_fail_after(long k);
/* Multiplication with overflow check: *out = a*b; returns 0 on overflow. */
int itr_mul_size(size_t a, size_t b, size_t *out);

/* ---- dtypes ------------------------------------------------------------------------------- */

typedef enum { ITR_F32 = 0, ITR_F16 = 1, ITR_BF16 = 2, ITR_F64 = 3, ITR_DTYPE_COUNT } itr_dtype;
size_t itr_dtype_size(itr_dtype dt);
const char *itr_dtype_name(itr_dtype dt); /* "F32", "F16", "BF16", "F64" */
/* Parses a safetensors dtype string; returns 0 when unknown. */
int itr_dtype_parse(const char *s, itr_dtype *out);

/* IEEE half and bfloat16 conversions. float->half/bf16 round to nearest even, keep
 * infinities and NaN (NaN stays NaN, quiet), produce subnormals and overflow to infinity. */
float itr_f16_to_f32(uint16_t h);
uint16_t itr_f32_to_f16(float f);
float itr_bf16_to_f32(uint16_t b);
uint16_t itr_f32_to_bf16(float f);
/* Converts n elements of src (dtype dt, little-endian, possibly unaligned) to float/double. */
void itr_convert_to_f32(itr_dtype dt, const void *src, size_t n, float *dst);
void itr_convert_to_f64(itr_dtype dt, const void *src, size_t n, double *dst);
/* Converts n floats to dtype dt into dst (unaligned allowed). */
void itr_convert_from_f32(itr_dtype dt, const float *src, size_t n, void *dst);

/* ---- deterministic random numbers (rng.c) ---------------------------------------------------- */

/* xoshiro256** seeded through splitmix64; normals by Marsaglia's polar method. Integer arithmetic
 * (but for the polar method's log and sqrt), so streams do not depend on the platform. Used by the
 * generators (src/synth) and DARE (src/merge). */
typedef struct {
  uint64_t s[4];   /* xoshiro256** state */
  int has_spare;   /* the polar method makes normals in pairs */
  double spare;
} itr_rng;

/* Seeds the state with four splitmix64 outputs of seed. */
void itr_rng_init(itr_rng *g, uint64_t seed);
/* One of many independent streams of a seed: stream mixed in through splitmix64 first. */
void itr_rng_init_stream(itr_rng *g, uint64_t seed, uint64_t stream);
uint64_t itr_splitmix64(uint64_t *state); /* advances *state, returns the next output */
uint64_t itr_rng_next(itr_rng *g);        /* xoshiro256** */
double itr_rng_uniform(itr_rng *g);       /* [0, 1), 53 random bits */
uint64_t itr_rng_below(itr_rng *g, uint64_t n); /* uniform in [0, n), unbiased; n >= 1 */
double itr_rng_normal(itr_rng *g);        /* standard normal */
uint64_t itr_hash64(const char *s);       /* FNV-1a 64 of a string (NULL: the empty string) */
/* FNV-1a 64 of n bytes, continuing from h (start with itr_hash64(NULL)). */
uint64_t itr_hash64_bytes(uint64_t h, const void *p, size_t n);

/* ---- timers ------------------------------------------------------------------------------- */

double itr_wtime(void); /* seconds, monotonic */

/* ---- the one scaled residual (residual.c; docs/ALGORITHM.md, "Checking a solve") -------------- */

/* HPL's scaled residual of a solve A X = B with n unknowns per right-hand side:
 *   ||A X - B||_inf / ((||A||_inf ||X||_inf + ||B||_inf) n eps),  eps = 2^-53 (LAPACK's dlamch('E')),
 * from the four infinity norms (max row sums). A solve PASSED when it is below
 * ITR_RESIDUAL_THRESHOLD (HPL's 16); NaN never passes. A zero denominator gives 0 for a zero
 * residual and infinity otherwise. */
#define ITR_RESIDUAL_THRESHOLD 16.0
double itr_scaled_residual(double r_inf, double a_inf, double x_inf, double b_inf, int64_t n);
/* Whether a scaled residual passes (below the threshold; NaN fails). */
int itr_residual_passed(double scaled);
/* The one FAILED policy: sets ITR_ERR_NUMERIC (exit 3) with a message naming the module (label,
 * e.g. "layers.3.mlp.down_proj"), the residual and the ridge to raise; returns the code. */
itr_err itr_residual_error(const char *label, double scaled, double alpha_2);
/* Fault injection for the tests of that policy (ITERIS_FAULT_RESIDUAL=LABEL, read by main): the
 * solvers add 1 to the solution of the system named label before they check it, so its residual
 * FAILS. NULL or "" turns it off. Not thread-safe; set once at start. */
void itr_fault_residual_set(const char *label);
int itr_fault_residual(const char *label);

#ifdef __cplusplus
}
#endif
#endif
