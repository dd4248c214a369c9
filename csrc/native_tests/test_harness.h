// A tiny self-contained test harness for the native unit tests (no external framework).
//
//   MOEFAST_TEST(name) { ... CHECK(cond); CHECK_EQ(a, b); CHECK_NEAR(a, b, tol); ... }
//
// Checks are non-fatal: a failing check prints file:line and the values, marks the current test
// as failed and the test goes on (REQUIRE(cond) returns from the test instead). Each test binary
// links test_main.cpp, which runs every registered test (or those whose name contains argv[1])
// and exits non-zero when any failed, so ctest reports it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace moefast::test {

struct TestCase {
  const char* name;
  void (*fn)();
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

struct Registrar {
  Registrar(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};

// State of the running test.
struct Current {
  const char* name = "";
  int64_t failures = 0;  // failed checks in the running test
  int64_t checks = 0;    // checks evaluated in the running test
};

inline Current& current() {
  static Current c;
  return c;
}

// Prints at most this many failure messages per test, then only counts.
constexpr int64_t kMaxPrintedFailures = 20;

inline void report_failure(const char* file, int line, const std::string& what) {
  Current& c = current();
  if (c.failures < kMaxPrintedFailures) {
    std::fprintf(stderr, "  %s:%d: [%s] check failed: %s\n", file, line, c.name, what.c_str());
  } else if (c.failures == kMaxPrintedFailures) {
    std::fprintf(stderr, "  [%s] further failures not printed\n", c.name);
  }
  ++c.failures;
}

template <typename T>
std::string to_str(const T& v) {
  std::ostringstream os;
  os.precision(17);
  if constexpr (sizeof(T) == 1 && std::is_integral_v<T>) {
    os << static_cast<int>(v);
  } else {
    os << v;
  }
  return os.str();
}

// |a - b| <= tol * max(1, |b|), with NaN == NaN and inf == inf of the same sign.
template <typename A, typename B>
bool near(A a_in, B b_in, double tol) {
  const double a = static_cast<double>(a_in);
  const double b = static_cast<double>(b_in);
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol * std::max(1.0, std::fabs(b));
}

inline bool check(bool ok, const char* file, int line, const char* expr) {
  ++current().checks;
  if (!ok) report_failure(file, line, expr);
  return ok;
}

template <typename A, typename B>
bool check_eq(const A& a, const B& b, const char* file, int line, const char* ea, const char* eb) {
  ++current().checks;
  const bool ok = a == b;
  if (!ok) {
    report_failure(file, line,
                   std::string(ea) + " == " + eb + " (" + to_str(a) + " vs " + to_str(b) + ")");
  }
  return ok;
}

template <typename A, typename B>
bool check_near(const A& a, const B& b, double tol, const char* file, int line, const char* ea,
                const char* eb) {
  ++current().checks;
  const bool ok = near(a, b, tol);
  if (!ok) {
    report_failure(file, line,
                   std::string(ea) + " ~= " + eb + " (" + to_str(a) + " vs " + to_str(b) +
                       ", tol " + to_str(tol) + ")");
  }
  return ok;
}

}  // namespace moefast::test

#define MOEFAST_TEST_CAT2(a, b) a##b
#define MOEFAST_TEST_CAT(a, b) MOEFAST_TEST_CAT2(a, b)

#define MOEFAST_TEST(name)                                                           \
  static void MOEFAST_TEST_CAT(moefast_test_fn_, name)();                            \
  static const ::moefast::test::Registrar MOEFAST_TEST_CAT(moefast_test_reg_, name)( \
      #name, &MOEFAST_TEST_CAT(moefast_test_fn_, name));                             \
  static void MOEFAST_TEST_CAT(moefast_test_fn_, name)()

#define CHECK(cond) ::moefast::test::check(static_cast<bool>(cond), __FILE__, __LINE__, #cond)
#define CHECK_EQ(a, b) ::moefast::test::check_eq((a), (b), __FILE__, __LINE__, #a, #b)
#define CHECK_NEAR(a, b, tol) \
  ::moefast::test::check_near((a), (b), (tol), __FILE__, __LINE__, #a, #b)
#define REQUIRE(cond)                                                                        \
  do {                                                                                       \
    if (!::moefast::test::check(static_cast<bool>(cond), __FILE__, __LINE__, #cond)) return; \
  } while (0)
