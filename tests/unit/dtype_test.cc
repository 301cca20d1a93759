// f16 / bf16 conversions against hand-computed IEEE bit patterns.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <gtest/gtest.h>

#include "iteris/core.h"

namespace {
float bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t fbits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
}  // namespace

TEST(Dtype, HalfExactValues) {
  EXPECT_EQ(itr_f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(itr_f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(itr_f32_to_f16(65504.0f), 0x7bff);  // largest finite half
  EXPECT_EQ(itr_f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(itr_f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(1023.0f, -24)), 0x03ff);  // largest subnormal
  EXPECT_EQ(itr_f16_to_f32(0x3555), bits(0x3eaaa000u));        // 0.333251953125
  EXPECT_EQ(itr_f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(itr_f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(itr_f16_to_f32(0x8000), -0.0f);
  EXPECT_TRUE(std::signbit(itr_f16_to_f32(0x8000)));
}

TEST(Dtype, HalfRoundsToNearestEven) {
  // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties to even (1.0)
  EXPECT_EQ(itr_f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  // 1 + 3*2^-11 is halfway between 1+2^-10 (odd) and 1+2^-9 (even): rounds up
  EXPECT_EQ(itr_f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  // just above the tie rounds up
  EXPECT_EQ(itr_f32_to_f16(bits(fbits(1.0f + std::ldexp(1.0f, -11)) + 1)), 0x3c01);
  // 65519 rounds down to 65504, 65520 (tie, 65504 odd) rounds to infinity
  EXPECT_EQ(itr_f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(itr_f32_to_f16(65520.0f), 0x7c00);
  EXPECT_EQ(itr_f32_to_f16(-1e6f), 0xfc00);
  // subnormal rounding: 2^-25 is a tie between 0 and 2^-24 -> 0; just above -> 2^-24
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(itr_f32_to_f16(bits(fbits(std::ldexp(1.0f, -25)) + 1)), 0x0001);
  // 1.5 * 2^-24 is a tie between 1 and 2 (units of 2^-24) -> 2 (even)
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);
  // 2.5 * 2^-24 -> 2 (even)
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(5.0f, -25)), 0x0002);
  // largest subnormal + half ulp rounds up into the smallest normal
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(2047.0f, -25)), 0x0400);
  EXPECT_EQ(itr_f32_to_f16(std::ldexp(1.0f, -30)), 0x0000);
}

TEST(Dtype, HalfInfinityAndNaN) {
  EXPECT_EQ(itr_f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(itr_f32_to_f16(-std::numeric_limits<float>::infinity()), 0xfc00);
  uint16_t n = itr_f32_to_f16(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(n & 0x7c00, 0x7c00);
  EXPECT_NE(n & 0x03ff, 0);
  EXPECT_NE(itr_f32_to_f16(bits(0x7f800001u)) & 0x03ff, 0);  // signalling NaN with low payload stays NaN
  EXPECT_TRUE(std::isinf(itr_f16_to_f32(0x7c00)));
  EXPECT_TRUE(std::isnan(itr_f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(itr_f16_to_f32(0xfc01)));
}

TEST(Dtype, HalfRoundTripsEveryFiniteValue) {
  for (uint32_t h = 0; h < 0x10000; h++) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // NaN
    ASSERT_EQ(itr_f32_to_f16(itr_f16_to_f32((uint16_t)h)), h) << std::hex << h;
  }
}

TEST(Dtype, BFloat16RoundingAndSpecials) {
  EXPECT_EQ(itr_f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(itr_f32_to_bf16(-2.0f), 0xc000);
  // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: even -> 1
  EXPECT_EQ(itr_f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3*2^-8: tie between 0x3f81 (odd) and 0x3f82 -> 0x3f82
  EXPECT_EQ(itr_f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(itr_f32_to_bf16(bits(0x3f808001u)), 0x3f81);
  // the largest float rounds to infinity; the largest bf16 stays
  EXPECT_EQ(itr_f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(itr_f32_to_bf16(bits(0x7f7f0000u)), 0x7f7f);
  EXPECT_EQ(itr_f32_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  // subnormals: truncation of 0x00018000 is a tie -> even (0x0002); 0x00010001 -> 0x0001
  EXPECT_EQ(itr_f32_to_bf16(bits(0x00018000u)), 0x0002);
  EXPECT_EQ(itr_f32_to_bf16(bits(0x00010001u)), 0x0001);
  // NaN whose payload is only in the low bits must not become infinity
  uint16_t n = itr_f32_to_bf16(bits(0x7f800001u));
  EXPECT_EQ(n & 0x7f80, 0x7f80);
  EXPECT_NE(n & 0x007f, 0);
  EXPECT_EQ(itr_bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(itr_bf16_to_f32(0x0001), bits(0x00010000u));
  EXPECT_TRUE(std::isnan(itr_bf16_to_f32(0x7fc0)));
}

TEST(Dtype, ConvertArraysUnaligned) {
  unsigned char buf[1 + 3 * 8];
  float src[3] = {1.5f, -0.25f, 3.0f}, dst[3];
  double d64[3];
  for (int dt = 0; dt < ITR_DTYPE_COUNT; dt++) {
    itr_convert_from_f32((itr_dtype)dt, src, 3, buf + 1);
    itr_convert_to_f32((itr_dtype)dt, buf + 1, 3, dst);
    itr_convert_to_f64((itr_dtype)dt, buf + 1, 3, d64);
    for (int i = 0; i < 3; i++) {
      EXPECT_EQ(dst[i], src[i]) << itr_dtype_name((itr_dtype)dt);
      EXPECT_EQ(d64[i], (double)src[i]) << itr_dtype_name((itr_dtype)dt);
    }
  }
  itr_dtype dt;
  EXPECT_TRUE(itr_dtype_parse("BF16", &dt));
  EXPECT_EQ(dt, ITR_BF16);
  EXPECT_FALSE(itr_dtype_parse("I8", &dt));
}
