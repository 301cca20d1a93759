/* Deterministic random numbers: splitmix64 (seeding, streams), xoshiro256** (the stream),
 * Marsaglia's polar method (normals), FNV-1a string hashes. */
#include <math.h>

#include "iteris/core.h"

uint64_t itr_splitmix64(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

void itr_rng_init(itr_rng *g, uint64_t seed) {
  uint64_t x = seed;
  for (int i = 0; i < 4; i++) g->s[i] = itr_splitmix64(&x);
  g->has_spare = 0;
  g->spare = 0.0;
}

void itr_rng_init_stream(itr_rng *g, uint64_t seed, uint64_t stream) {
  uint64_t t = stream;
  uint64_t x = seed ^ itr_splitmix64(&t);
  for (int i = 0; i < 4; i++) g->s[i] = itr_splitmix64(&x);
  g->has_spare = 0;
  g->spare = 0.0;
}

uint64_t itr_hash64_bytes(uint64_t h, const void *p, size_t n) {
  const unsigned char *b = p;
  for (size_t i = 0; i < n; i++) {
    h ^= b[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

uint64_t itr_hash64(const char *s) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (; s && *s; s++) {
    h ^= (unsigned char)*s;
    h *= 0x100000001b3ULL;
  }
  return h;
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t itr_rng_next(itr_rng *g) {
  uint64_t *s = g->s;
  const uint64_t result = rotl(s[1] * 5, 7) * 9;
  const uint64_t t = s[1] << 17;
  s[2] ^= s[0];
  s[3] ^= s[1];
  s[1] ^= s[2];
  s[0] ^= s[3];
  s[2] ^= t;
  s[3] = rotl(s[3], 45);
  return result;
}

double itr_rng_uniform(itr_rng *g) { return (double)(itr_rng_next(g) >> 11) * 0x1.0p-53; }

uint64_t itr_rng_below(itr_rng *g, uint64_t n) {
  if (n <= 1) return 0;
  uint64_t threshold = (0 - n) % n; /* 2^64 mod n: reject the first values to remove the bias */
  for (;;) {
    uint64_t x = itr_rng_next(g);
    if (x >= threshold) return x % n;
  }
}

double itr_rng_normal(itr_rng *g) {
  if (g->has_spare) {
    g->has_spare = 0;
    return g->spare;
  }
  double u, v, s;
  do {
    u = 2.0 * itr_rng_uniform(g) - 1.0;
    v = 2.0 * itr_rng_uniform(g) - 1.0;
    s = u * u + v * v;
  } while (s >= 1.0 || s == 0.0);
  double m = sqrt(-2.0 * log(s) / s);
  g->spare = v * m;
  g->has_spare = 1;
  return u * m;
}
