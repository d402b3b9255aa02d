// sdvg-rt's C++ embedding library: one sdvg_rt.Runtime inside this process, driven from C++.
//
//   #include <sdvg/runtime.hpp>
//   sdvg::Options opt;
//   opt.device = "cuda";
//   auto rt = sdvg::Runtime::create("profiles/paper-832x480.yaml", opt);
//   auto prompts = rt->encode_prompts({"a red fox in the snow"});
//   sdvg::Stats st = rt->generate(prompts[0], {}, [](const sdvg::Block& b) {
//     // b.frames.data: uint8 [frames, height, width, 3], valid until this callback returns
//   });
//
// The library starts the Python interpreter on first use (the one it was built against, with its
// site-packages) and releases the GIL whenever it is not running Python, including while a block callback
// runs; the runtime's own GPU work runs with the GIL released as well, so other threads of the service
// keep running. One call at a time per Runtime: a second concurrent call from another thread throws
// BusyError. cancel() may be called from any thread (or from the callback); the running generate() stops
// after its current block and throws CancelledError.
//
// Errors are typed; Error::code() is the runtime's exit code (sdvg_rt.errors, the `sdvg-rt` CLI's exit
// status): 2 profile or input, 3 checkpoint, 4 backend or engine, 5 out of memory, 6 numerical, 7 busy,
// 8 output, 130 cancelled, 1 anything else.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace sdvg {

// ---- errors ------------------------------------------------------------------------------------------
class Error : public std::runtime_error {
 public:
  Error(int code, std::string type, const std::string& message)
      : std::runtime_error(message), code_(code), type_(std::move(type)) {}
  int code() const noexcept { return code_; }                    // the runtime's exit code
  const std::string& type() const noexcept { return type_; }     // the Python class, e.g. "ProfileError"

 private:
  int code_;
  std::string type_;
};

#define SDVG_ERROR(Name, Code)                                                    \
  class Name : public Error {                                                     \
   public:                                                                        \
    static constexpr int kCode = Code;                                            \
    Name(std::string type, const std::string& message) : Error(Code, std::move(type), message) {} \
  };
SDVG_ERROR(ProfileError, 2)      // ProfileError, PromptFileError: bad profile or input
SDVG_ERROR(CheckpointError, 3)   // missing, corrupt or mismatched checkpoint
SDVG_ERROR(BackendError, 4)      // BackendUnavailableError, EngineMismatchError
SDVG_ERROR(OutOfMemoryError, 5)
SDVG_ERROR(NumericalError, 6)
SDVG_ERROR(BusyError, 7)         // another call of this Runtime is running
SDVG_ERROR(OutputError, 8)
SDVG_ERROR(CancelledError, 130)  // cancel() stopped the generation
#undef SDVG_ERROR

// ---- values ------------------------------------------------------------------------------------------
// A block's frames: uint8 RGB, C order [frames, height, width, channels]; `data` points into the
// runtime's own array (no copy) and is valid only during the callback that received it.
struct Frames {
  const std::uint8_t* data = nullptr;
  std::int64_t frames = 0, height = 0, width = 0, channels = 0;
  std::size_t bytes() const { return static_cast<std::size_t>(frames * height * width * channels); }
};

struct Block {
  int index = 0;
  std::string decision;       // "forced", "accepted", "rejected" (sdvg), "target", "draft"
  double min_score = 0;       // the block's worst ImageReward score, NaN when it was not scored
  Frames frames;
  std::string record_json;    // the block's record, as in the run's JSON file
};

struct Stats {
  std::string json;            // the video's whole record (the JSON file `sdvg-rt run` writes)
  double acceptance_rate = 0;  // NaN when no draft was judged
  double wall_time_s = 0;
  std::int64_t frames = 0;
  int blocks = 0;
};

using BlockCallback = std::function<void(const Block&)>;

struct Options {
  std::string device;                                         // "cuda", "cuda:1", "cpu"; empty: CUDA if available
  std::vector<std::pair<std::string, std::string>> overrides;  // profile fields, e.g. {"tau", "-0.5"}
  bool text_encoder = true;                                   // load umT5 (needed by encode_prompts)
};

struct GenerateOptions {
  std::optional<std::uint64_t> seed;  // defaults: the profile's sampling section
  std::optional<double> tau;
  std::string mode;                   // "", "sdvg", "draft", "target"
};

// A prompt encoded once (umT5 context held by the runtime); reusable across generations.
class Prompt {
 public:
  Prompt(Prompt&&) noexcept;
  Prompt& operator=(Prompt&&) noexcept;
  Prompt(const Prompt&) = delete;
  Prompt& operator=(const Prompt&) = delete;
  ~Prompt();
  const std::string& text() const { return text_; }

 private:
  friend class Runtime;
  Prompt(void* handle, std::string text) : handle_(handle), text_(std::move(text)) {}
  void* handle_ = nullptr;  // the PreparedPrompt
  std::string text_;
};

class Runtime {
 public:
  // Load a profile (weights on the device; caches are allocated by warmup() or the first generation).
  static std::unique_ptr<Runtime> create(const std::string& profile, const Options& options = {});
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  std::vector<Prompt> encode_prompts(const std::vector<std::string>& prompts);
  void release_text_encoder();   // frees umT5 (encode_prompts fails afterwards)
  double warmup();               // allocate and run every component once; seconds

  // Generate one video; `on_block` gets each committed block as soon as its frames are on the host.
  Stats generate(const Prompt& prompt, const GenerateOptions& options = {}, const BlockCallback& on_block = {});
  Stats generate(const std::string& prompt, const GenerateOptions& options = {},
                 const BlockCallback& on_block = {});

  // Thread-safe: stop the running generation after its current block (it throws CancelledError).
  // No effect when nothing is generating.
  void cancel() noexcept;
  bool busy() const noexcept;

  std::string device() const;        // e.g. "cuda:0"
  std::string profile_name() const;

  struct Impl;

 private:
  explicit Runtime(std::unique_ptr<Impl> impl);
  Stats run(void* prompt, const GenerateOptions& options, const BlockCallback& on_block);
  std::unique_ptr<Impl> impl_;
};

// sdvg_rt.__version__ (starts the interpreter if needed).
std::string version();

// The interpreter the library uses: started on first use; finalize() ends it (call it last, after every
// Runtime is gone, or never: the process exit releases it). Python cannot be restarted afterwards.
void finalize();

}  // namespace sdvg
