// Embedding sdvg-rt in a C++ program with the library in embed/ (sdvg::Runtime): load a profile once,
// stream one video block by block, print what each block was and the video's statistics.
//
//   ./embed_demo [profile.yaml] [prompt] [device]
//
// Frames arrive in place (pointer + shape into the runtime's own array, valid during the callback). A
// runtime error is typed (sdvg::Error); its code() becomes this program's exit status, as with `sdvg-rt`.
#include <sdvg/runtime.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  const char* profile = argc > 1 ? argv[1] : "profiles/tiny.yaml";
  const char* prompt = argc > 2 ? argv[2] : "a red fox running through fresh snow";
  sdvg::Options options;
  options.device = argc > 3 ? argv[3] : "cpu";
  try {
    auto rt = sdvg::Runtime::create(profile, options);
    unsigned long long checksum = 0;
    sdvg::Stats st = rt->generate(prompt, {}, [&](const sdvg::Block& b) {
      for (std::size_t i = 0; i < b.frames.bytes(); i += 997) checksum += b.frames.data[i];
      std::printf("block %d: %s, %lld frames\n", b.index, b.decision.c_str(), static_cast<long long>(b.frames.frames));
    });
    std::printf("frames: %lld on %s\n", static_cast<long long>(st.frames), rt->device().c_str());
    if (st.acceptance_rate == st.acceptance_rate)  // NaN when no draft was judged
      std::printf("acceptance: %.3f\n", st.acceptance_rate);
    std::printf("wall time: %.2f s, checksum %llu\n", st.wall_time_s, checksum);
  } catch (const sdvg::Error& e) {
    std::fprintf(stderr, "embed_demo: %s (exit code %d): %s\n", e.type().c_str(), e.code(), e.what());
    return e.code();
  }
  sdvg::finalize();
  return 0;
}
