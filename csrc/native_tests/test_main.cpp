// Runs the tests registered with MOEFAST_TEST in the binary; argv[1] (optional) filters by
// substring of the test name. Exit status 0 when every test passed.
#include <chrono>
#include <cstdio>
#include <cstring>

#include "test_harness.h"

int main(int argc, char** argv) {
  using moefast::test::current;
  using moefast::test::registry;
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int run = 0;
  int failed = 0;
  int64_t checks = 0;
  for (const auto& tc : registry()) {
    if (filter != nullptr && std::strstr(tc.name, filter) == nullptr) continue;
    current() = moefast::test::Current{tc.name, 0, 0};
    const auto t0 = std::chrono::steady_clock::now();
    tc.fn();
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    ++run;
    checks += current().checks;
    if (current().checks == 0) {
      std::fprintf(stderr, "  [%s] ran no checks\n", tc.name);
      ++current().failures;
    }
    const bool ok = current().failures == 0;
    if (!ok) ++failed;
    std::printf("[%s] %s (%lld checks, %.1f ms)\n", ok ? "  OK  " : " FAIL ", tc.name,
                static_cast<long long>(current().checks), ms);
  }
  std::printf("%d test(s), %d failed, %lld checks\n", run, failed, static_cast<long long>(checks));
  if (run == 0) {
    std::printf("no test matched\n");
    return 1;
  }
  return failed == 0 ? 0 : 1;
}
