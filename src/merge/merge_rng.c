/* Deterministic random numbers for DARE: xoshiro256** seeded through splitmix64, one stream per
 * (seed, stream) pair, so that results do not depend on which rank draws them. */
#include "iteris/merge.h"

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

void itr_merge_rng_seed(itr_merge_rng *g, uint64_t seed, uint64_t stream) {
  uint64_t t = stream;
  uint64_t x = seed ^ splitmix64(&t);
  for (int i = 0; i < 4; i++) g->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t itr_merge_rng_u64(itr_merge_rng *g) {
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

double itr_merge_rng_uniform(itr_merge_rng *g) { return (double)(itr_merge_rng_u64(g) >> 11) * 0x1.0p-53; }

uint64_t itr_merge_hash(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; s && *s; s++) {
    h ^= (unsigned char)*s;
    h *= 0x100000001b3ull;
  }
  return h;
}
