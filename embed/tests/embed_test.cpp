// The embedding library's test program: generate with callbacks, cancel from another thread, a concurrent
// call refused with BusyError, Python running in another thread during a generation, typed errors.
//
//   sdvg_embed_test <profile.yaml> [device]      (exit status 0 when every check passed)
#include <sdvg/runtime.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

template <class E, class F>
void expect_throw(F&& f, int code, const std::string& type, const std::string& words, const std::string& what) {
  try {
    f();
    check(false, what + " (nothing thrown)");
  } catch (const E& e) {
    bool ok = e.code() == code && e.type() == type && std::string(e.what()).find(words) != std::string::npos;
    if (!ok) std::printf("  got code %d type %s: %s\n", e.code(), e.type().c_str(), e.what());
    check(ok, what);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s <profile.yaml> [device]\n", argv[0]);
    return 2;
  }
  sdvg::Options opt;
  opt.device = argc > 2 ? argv[2] : "cpu";
  check(sdvg::version().size() > 0, "sdvg_rt version " + sdvg::version());

  // typed errors: a missing profile is the runtime's ProfileError (exit code 2)
  expect_throw<sdvg::ProfileError>([&] { sdvg::Runtime::create("missing-profile.yaml", opt); }, 2, "ProfileError",
                                   "missing-profile.yaml", "missing profile -> ProfileError, code 2");
  sdvg::Options bad = opt;
  bad.device = "tpu";
  expect_throw<sdvg::BackendError>([&] { sdvg::Runtime::create(argv[1], bad); }, 4, "BackendUnavailableError",
                                   "tpu", "unknown device -> BackendError, code 4");

  auto rt = sdvg::Runtime::create(argv[1], opt);
  check(rt->device() == opt.device, "runtime on " + rt->device() + ", profile " + rt->profile_name());
  auto prompts = rt->encode_prompts({"a red fox running through fresh snow", "a city at night"});
  check(prompts.size() == 2 && prompts[1].text() == "a city at night", "two prompts encoded");

  // 1. a whole video, block by block
  std::vector<int> order;
  std::int64_t frames = 0;
  bool shapes_ok = true;
  unsigned long long sum = 0;
  sdvg::GenerateOptions g;
  g.seed = 3;
  sdvg::Stats st = rt->generate(prompts[0], g, [&](const sdvg::Block& b) {
    order.push_back(b.index);
    frames += b.frames.frames;
    shapes_ok = shapes_ok && b.frames.data != nullptr && b.frames.channels == 3 && b.frames.height > 0 &&
                b.record_json.find("\"decision\": \"" + b.decision + "\"") != std::string::npos;
    for (std::size_t i = 0; i < b.frames.bytes(); i += 61) sum += b.frames.data[i];
  });
  bool in_order = !order.empty();
  for (std::size_t i = 0; i < order.size(); ++i) in_order = in_order && order[i] == static_cast<int>(i);
  check(in_order && static_cast<int>(order.size()) == st.blocks, "blocks 0.." + std::to_string(order.size() - 1) +
                                                                    " delivered in order");
  check(shapes_ok && frames == st.frames && st.json.find("\"blocks\"") != std::string::npos,
        "frames " + std::to_string(frames) + " == stats.frames, records and stats JSON");
  unsigned long long sum2 = 0;
  sdvg::Stats again = rt->generate(prompts[0], g, [&](const sdvg::Block& b) {
    for (std::size_t i = 0; i < b.frames.bytes(); i += 61) sum2 += b.frames.data[i];
  });
  check(sum2 == sum && again.frames == st.frames, "same seed, same frames (checksum " + std::to_string(sum) + ")");

  // 2. cancel from another thread: block 0's callback waits until the other thread has cancelled
  std::mutex m;
  std::condition_variable cv;
  bool first = false, cancelled = false;
  std::thread canceller([&] {
    std::unique_lock<std::mutex> lk(m);
    cv.wait(lk, [&] { return first; });
    rt->cancel();
    cancelled = true;
    cv.notify_all();
  });
  int seen = 0;
  expect_throw<sdvg::CancelledError>(
      [&] {
        rt->generate(prompts[1], {}, [&](const sdvg::Block&) {
          ++seen;
          std::unique_lock<std::mutex> lk(m);
          first = true;
          cv.notify_all();
          cv.wait(lk, [&] { return cancelled; });
        });
      },
      130, "CancelledError", "after block 0", "cancel() from another thread -> CancelledError, code 130");
  canceller.join();
  check(seen == 1, "the cancelled generation stopped after its current block");

  // 3. while one thread generates, another gets BusyError for a second call and can still run Python
  std::atomic<bool> in_callback{false}, done{false};
  std::atomic<int> callbacks{0};
  std::atomic<int> python_calls{0}, busy_refused{0};
  std::thread other([&] {
    while (!rt->busy() && !done) std::this_thread::yield();
    while (!done) {
      try {
        rt->generate(prompts[1], {}, {});
      } catch (const sdvg::BusyError& e) {
        if (e.code() == 7) ++busy_refused;
      }
      int before = callbacks;
      bool outside = !in_callback && rt->busy();
      sdvg::version();  // needs the GIL: it returns while the generating thread is inside Python
      if (outside && !in_callback && rt->busy() && callbacks == before) ++python_calls;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a service thread, not a spin loop
    }
  });
  sdvg::Stats third = rt->generate(prompts[1], {}, [&](const sdvg::Block&) {
    in_callback = true;
    ++callbacks;
    in_callback = false;
  });
  done = true;
  other.join();
  check(busy_refused > 0, "a concurrent generate() -> BusyError, code 7 (" + std::to_string(busy_refused) + "x)");
  check(python_calls > 0, "another thread ran Python during the generation (" + std::to_string(python_calls) + "x)");
  check(third.blocks == st.blocks, "the runtime generates normally after a cancel and a refused call");

  // 4. errors inside a generation: a bad mode from the runtime, an exception from the callback
  sdvg::GenerateOptions bad_mode;
  bad_mode.mode = "fastest";
  expect_throw<sdvg::Error>([&] { rt->generate(prompts[0], bad_mode, {}); }, 2, "ArgumentError", "mode must be one of",
                            "bad mode -> Error, code 2 (ArgumentError)");
  try {
    rt->generate(prompts[0], {}, [](const sdvg::Block&) { throw std::runtime_error("callback failed"); });
    check(false, "a callback's exception propagates");
  } catch (const std::runtime_error& e) {
    check(std::string(e.what()) == "callback failed", "a callback's exception propagates");
  }
  rt->release_text_encoder();
  expect_throw<sdvg::Error>([&] { rt->encode_prompts({"late"}); }, 1, "SdvgError", "text encoder was released",
                            "encode after release_text_encoder -> SdvgError, code 1");
  sdvg::Stats fourth = rt->generate(prompts[0], g, {});
  check(fourth.frames == st.frames, "a prepared prompt still generates after the text encoder is released");
  rt.reset();
  sdvg::finalize();
  std::printf("%s\n", failures ? "FAILED" : "ALL PASSED");
  return failures ? 1 : 0;
}
