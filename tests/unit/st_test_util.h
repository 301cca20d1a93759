// Helpers for the safetensors tests: a scratch folder, raw byte files, and a hand-made
// safetensors builder independent of the writer under test.
#ifndef ITERIS_TESTS_ST_TEST_UTIL_H
#define ITERIS_TESTS_ST_TEST_UTIL_H

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>

#include <gtest/gtest.h>

#include "../common/test_files.h"
#include "iteris/core.h"

namespace st_test {

using itr_test::read_file;
using itr_test::TempDir;
using itr_test::write_file;

// 8-byte little-endian length.
inline std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; i++) s[i] = (char)((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file by hand: prefix + header + data.
inline std::string st_bytes(const std::string &header, const std::string &data) {
  return le64(header.size()) + header + data;
}

inline std::string f32_bytes(std::initializer_list<float> v) {
  std::string s;
  for (float x : v) s.append(reinterpret_cast<const char *>(&x), 4);
  return s;
}

inline std::string f64_bytes(std::initializer_list<double> v) {
  std::string s;
  for (double x : v) s.append(reinterpret_cast<const char *>(&x), 8);
  return s;
}

// Checks an error code and that the current message contains each of the given substrings.
inline ::testing::AssertionResult has_error(itr_err got, itr_err want, std::initializer_list<std::string> parts) {
  std::string m = itr_error_message();
  if (got != want)
    return ::testing::AssertionFailure() << "error code " << got << ", expected " << want << "; message: " << m;
  for (const auto &p : parts)
    if (m.find(p) == std::string::npos)
      return ::testing::AssertionFailure() << "message lacks '" << p << "': " << m;
  return ::testing::AssertionSuccess();
}

}  // namespace st_test

#endif
