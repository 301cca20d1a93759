/* Element types of tensor files and exact IEEE conversions between them.
 * All stored data is little-endian; the code reads it with memcpy (unaligned-safe). */
#include <math.h>
#include <string.h>

#include "iteris/core.h"

static const struct {
  const char *name;
  size_t size;
} dtypes_[ITR_DTYPE_COUNT] = {
    [ITR_F32] = {"F32", 4}, [ITR_F16] = {"F16", 2}, [ITR_BF16] = {"BF16", 2}, [ITR_F64] = {"F64", 8}};

size_t itr_dtype_size(itr_dtype dt) { return (unsigned)dt < ITR_DTYPE_COUNT ? dtypes_[dt].size : 0; }
const char *itr_dtype_name(itr_dtype dt) {
  return (unsigned)dt < ITR_DTYPE_COUNT ? dtypes_[dt].name : "?";
}
int itr_dtype_parse(const char *s, itr_dtype *out) {
  for (int i = 0; i < ITR_DTYPE_COUNT; i++)
    if (strcmp(s, dtypes_[i].name) == 0) {
      *out = (itr_dtype)i;
      return 1;
    }
  return 0;
}

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
static float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

float itr_bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

uint16_t itr_f32_to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
  x += 0x7fffu + ((x >> 16) & 1u); /* round to nearest even; overflows to infinity */
  return (uint16_t)(x >> 16);
}

float itr_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_f32(sign);
    int e = -1; /* normalise a subnormal: value = mant * 2^-24 */
    do {
      mant <<= 1;
      e++;
    } while (!(mant & 0x400u));
    mant &= 0x3ffu;
    return bits_f32(sign | ((uint32_t)(127 - 15 - e) << 23) | (mant << 13));
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t itr_f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) { /* infinity or NaN */
    if (x > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
    return (uint16_t)(sign | 0x7c00u);
  }
  if (x >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to infinity */
  if (x >= 0x38800000u) {                                   /* normal half: >= 2^-14 */
    x += 0xfffu + ((x >> 13) & 1u);
    x -= (uint32_t)(127 - 15) << 23;
    return (uint16_t)(sign | (x >> 13));
  }
  if (x < 0x33000000u) return sign; /* below 2^-25: rounds to zero */
  uint32_t e = x >> 23, m = (x & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126 - e; /* value in units of 2^-24 is m >> shift; shift in 14..24 */
  uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) q++;
  return (uint16_t)(sign | q);
}

void itr_convert_to_f32(itr_dtype dt, const void *src, size_t n, float *dst) {
  const unsigned char *s = src;
  switch (dt) {
    case ITR_F32: memcpy(dst, src, n * 4); break;
    case ITR_F64:
      for (size_t i = 0; i < n; i++) {
        double d;
        memcpy(&d, s + 8 * i, 8);
        dst[i] = (float)d;
      }
      break;
    case ITR_F16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = itr_f16_to_f32(h);
      }
      break;
    case ITR_BF16:
      for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = itr_bf16_to_f32(h);
      }
      break;
    default: break;
  }
}

void itr_convert_to_f64(itr_dtype dt, const void *src, size_t n, double *dst) {
  const unsigned char *s = src;
  if (dt == ITR_F64) {
    memcpy(dst, src, n * 8);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    float f;
    switch (dt) {
      case ITR_F32: memcpy(&f, s + 4 * i, 4); break;
      case ITR_F16: {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        f = itr_f16_to_f32(h);
      } break;
      case ITR_BF16: {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        f = itr_bf16_to_f32(h);
      } break;
      default: f = NAN; break;
    }
    dst[i] = f;
  }
}

void itr_convert_from_f32(itr_dtype dt, const float *src, size_t n, void *dst) {
  unsigned char *d = dst;
  for (size_t i = 0; i < n; i++) {
    switch (dt) {
      case ITR_F32: memcpy(d + 4 * i, &src[i], 4); break;
      case ITR_F64: {
        double v = src[i];
        memcpy(d + 8 * i, &v, 8);
      } break;
      case ITR_F16: {
        uint16_t h = itr_f32_to_f16(src[i]);
        memcpy(d + 2 * i, &h, 2);
      } break;
      case ITR_BF16: {
        uint16_t h = itr_f32_to_bf16(src[i]);
        memcpy(d + 2 * i, &h, 2);
      } break;
      default: break;
    }
  }
}
