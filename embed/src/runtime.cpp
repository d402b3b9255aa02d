// sdvg::Runtime over the Python runtime (sdvg_rt.embedding), through the CPython C API only.
#include "sdvg/runtime.hpp"

#include <Python.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>

#ifndef SDVG_PYTHON_EXECUTABLE
#define SDVG_PYTHON_EXECUTABLE ""  // the interpreter whose environment (venv, site-packages) to use
#endif

namespace sdvg {
namespace {

// ---- interpreter and GIL ----------------------------------------------------------------------------
std::once_flag g_init_once;
bool g_owned = false;  // started here (and so finalised by finalize())

void start_interpreter() {
  if (Py_IsInitialized()) return;  // the host already runs Python: use it
  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0;
  config.install_signal_handlers = 0;  // signals belong to the host service
  const char* exe = std::getenv("SDVG_PYTHON");
  if (exe == nullptr || exe[0] == '\0') exe = SDVG_PYTHON_EXECUTABLE;
  PyStatus st = PyStatus_Ok();
  if (exe[0] != '\0') st = PyConfig_SetBytesString(&config, &config.program_name, exe);
  if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st))
    throw Error(1, "InterpreterError", std::string("cannot start Python (") + (exe[0] ? exe : "default") +
                                           "): " + (st.err_msg ? st.err_msg : "unknown error"));
  g_owned = true;
  PyEval_SaveThread();  // release the GIL: every call below takes it only while it runs Python
}

void ensure_interpreter() { std::call_once(g_init_once, start_interpreter); }

struct Gil {
  PyGILState_STATE state;
  Gil() : state(PyGILState_Ensure()) {}
  ~Gil() { PyGILState_Release(state); }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;
};

struct NoGil {  // inside a Gil scope: let other threads run Python meanwhile
  PyThreadState* saved;
  NoGil() : saved(PyEval_SaveThread()) {}
  ~NoGil() { PyEval_RestoreThread(saved); }
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;
};

struct Ref {  // an owned reference; the GIL must be held when it dies
  PyObject* p;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  PyObject* get() const { return p; }
  PyObject* release() {
    PyObject* o = p;
    p = nullptr;
    return o;
  }
  explicit operator bool() const { return p != nullptr; }
};

PyObject* none() {
  Py_INCREF(Py_None);
  return Py_None;
}

[[noreturn]] void throw_code(int code, const std::string& type, const std::string& msg) {
  switch (code) {
    case ProfileError::kCode: throw ProfileError(type, msg);
    case CheckpointError::kCode: throw CheckpointError(type, msg);
    case BackendError::kCode: throw BackendError(type, msg);
    case OutOfMemoryError::kCode: throw OutOfMemoryError(type, msg);
    case NumericalError::kCode: throw NumericalError(type, msg);
    case BusyError::kCode: throw BusyError(type, msg);
    case OutputError::kCode: throw OutputError(type, msg);
    case CancelledError::kCode: throw CancelledError(type, msg);
    default: throw Error(code, type, msg);
  }
}

// The pending Python exception as a typed C++ one (code, type and message from embedding.error_info).
[[noreturn]] void throw_python_error(PyObject* embedding) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  Ref t(type), v(value), b(tb);
  int code = 1;
  std::string name = type ? reinterpret_cast<PyTypeObject*>(type)->tp_name : "Error";
  std::string msg = "unknown Python error";
  if (v && embedding) {
    Ref info(PyObject_CallMethod(embedding, "error_info", "O", v.get()));
    int c = 0;
    const char *n = nullptr, *m = nullptr;
    if (info && PyArg_ParseTuple(info.get(), "iss", &c, &n, &m)) {
      code = c;
      name = n;
      msg = m;
    }
  } else if (v) {
    Ref s(PyObject_Str(v.get()));
    if (s && PyUnicode_Check(s.get())) msg = PyUnicode_AsUTF8(s.get());
  }
  PyErr_Clear();
  throw_code(code, name, msg);
}

std::string str_of(PyObject* o) {
  const char* s = o ? PyUnicode_AsUTF8(o) : nullptr;
  if (!s) {
    PyErr_Clear();
    return {};
  }
  return s;
}

}  // namespace

// ---- Runtime ----------------------------------------------------------------------------------------
struct Runtime::Impl {
  PyObject* embedding = nullptr;  // sdvg_rt.embedding
  PyObject* runtime = nullptr;    // the sdvg_rt.Runtime
  std::mutex call;                // one call at a time; a concurrent one gets BusyError
  std::atomic<bool> cancel{false};
  std::atomic<bool> generating{false};
  std::string device, profile;
};

namespace {

// Holds the Runtime for one call, or throws BusyError naming what runs.
struct Busy {
  std::unique_lock<std::mutex> lock;
  Busy(Runtime::Impl& impl, const char* what) : lock(impl.call, std::try_to_lock) {
    if (!lock.owns_lock())
      throw BusyError("BusyError", std::string("this sdvg::Runtime is already running a call in another thread; ") +
                                       what + " waits for no one: call it when the running call returns, or "
                                       "create another Runtime (one per device)");
  }
};

}  // namespace

Runtime::Runtime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::unique_ptr<Runtime> Runtime::create(const std::string& profile, const Options& options) {
  ensure_interpreter();
  Gil gil;
  Ref mod(PyImport_ImportModule("sdvg_rt.embedding"));
  if (!mod) throw_python_error(nullptr);
  Ref overrides(PyList_New(0));
  for (const auto& kv : options.overrides) {
    Ref pair(Py_BuildValue("(ss)", kv.first.c_str(), kv.second.c_str()));
    if (!pair || PyList_Append(overrides.get(), pair.get()) != 0) throw_python_error(mod.get());
  }
  Ref device(options.device.empty() ? none() : PyUnicode_FromString(options.device.c_str()));
  Ref rt(PyObject_CallMethod(mod.get(), "create", "sOOO", profile.c_str(), device.get(), overrides.get(),
                             options.text_encoder ? Py_True : Py_False));
  if (!rt) throw_python_error(mod.get());
  auto impl = std::make_unique<Impl>();
  Ref dev(PyObject_GetAttrString(rt.get(), "device"));
  Ref dev_s(dev ? PyObject_Str(dev.get()) : nullptr);
  Ref prof(PyObject_GetAttrString(rt.get(), "profile"));
  Ref name(prof ? PyObject_GetAttrString(prof.get(), "name") : nullptr);
  if (!dev_s || !name) throw_python_error(mod.get());
  impl->device = str_of(dev_s.get());
  impl->profile = str_of(name.get());
  impl->embedding = mod.release();
  impl->runtime = rt.release();
  return std::unique_ptr<Runtime>(new Runtime(std::move(impl)));
}

Runtime::~Runtime() {
  if (!impl_ || !Py_IsInitialized()) return;
  std::lock_guard<std::mutex> wait(impl_->call);  // a call still running in another thread ends first
  Gil gil;
  Ref r(PyObject_CallMethod(impl_->runtime, "close", nullptr));
  if (!r) PyErr_Clear();
  Py_XDECREF(impl_->runtime);
  Py_XDECREF(impl_->embedding);
}

std::vector<Prompt> Runtime::encode_prompts(const std::vector<std::string>& prompts) {
  Busy busy(*impl_, "encode_prompts");
  Gil gil;
  Ref list(PyList_New(0));
  for (const auto& p : prompts) {
    Ref s(PyUnicode_FromStringAndSize(p.data(), static_cast<Py_ssize_t>(p.size())));
    if (!s || PyList_Append(list.get(), s.get()) != 0) throw_python_error(impl_->embedding);
  }
  Ref out(PyObject_CallMethod(impl_->runtime, "encode_prompts", "O", list.get()));
  if (!out) throw_python_error(impl_->embedding);
  std::vector<Prompt> result;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    PyObject* item = PyList_GetItem(out.get(), static_cast<Py_ssize_t>(i));  // borrowed
    if (!item) throw_python_error(impl_->embedding);
    Py_INCREF(item);
    result.push_back(Prompt(item, prompts[i]));
  }
  return result;
}

void Runtime::release_text_encoder() {
  Busy busy(*impl_, "release_text_encoder");
  Gil gil;
  Ref r(PyObject_CallMethod(impl_->runtime, "release_text_encoder", nullptr));
  if (!r) throw_python_error(impl_->embedding);
}

double Runtime::warmup() {
  Busy busy(*impl_, "warmup");
  Gil gil;
  Ref r(PyObject_CallMethod(impl_->runtime, "warmup", nullptr));
  if (!r) throw_python_error(impl_->embedding);
  return PyFloat_AsDouble(r.get());
}

Stats Runtime::generate(const Prompt& prompt, const GenerateOptions& options, const BlockCallback& on_block) {
  return run(prompt.handle_, options, on_block);
}

Stats Runtime::generate(const std::string& prompt, const GenerateOptions& options, const BlockCallback& on_block) {
  PyObject* text;  // encoded by the runtime as part of the generation
  {
    Gil gil;
    text = PyUnicode_FromStringAndSize(prompt.data(), static_cast<Py_ssize_t>(prompt.size()));
    if (!text) throw_python_error(impl_->embedding);
  }
  struct Drop {
    PyObject* o;
    ~Drop() {
      Gil gil;
      Py_DECREF(o);
    }
  } drop{text};
  return run(text, options, on_block);
}

Stats Runtime::run(void* prompt, const GenerateOptions& options, const BlockCallback& on_block) {
  // `prompt`: a PreparedPrompt, or a str (the runtime encodes it)
  Busy busy(*impl_, "generate");
  impl_->cancel = false;
  struct Flag {
    std::atomic<bool>& f;
    ~Flag() { f = false; }
  } generating{impl_->generating};
  impl_->generating = true;
  Gil gil;
  PyObject* emb = impl_->embedding;
  Ref seed(options.seed ? PyLong_FromUnsignedLongLong(*options.seed) : none());
  Ref tau(options.tau ? PyFloat_FromDouble(*options.tau) : none());
  Ref mode(options.mode.empty() ? none() : PyUnicode_FromString(options.mode.c_str()));
  Ref gen(PyObject_CallMethod(emb, "blocks", "OOOOO", impl_->runtime, static_cast<PyObject*>(prompt), seed.get(),
                              tau.get(), mode.get()));
  if (!gen) throw_python_error(emb);
  struct Closer {  // on every exit: close the stream so the Python Runtime is free again
    PyObject* g;
    ~Closer() {
      Ref r(PyObject_CallMethod(g, "close", nullptr));
      if (!r) PyErr_Clear();
    }
  } closer{gen.get()};
  while (true) {
    Ref item(PyIter_Next(gen.get()));
    if (!item) {
      if (PyErr_Occurred()) throw_python_error(emb);
      break;
    }
    int index = 0;
    const char *decision = nullptr, *record = nullptr;
    double score = 0;
    PyObject* frames = nullptr;  // borrowed from the tuple
    if (!PyArg_ParseTuple(item.get(), "isdOs", &index, &decision, &score, &frames, &record))
      throw_python_error(emb);
    Py_buffer view;  // the numpy array's own memory, held (and so valid) until released below
    if (PyObject_GetBuffer(frames, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) != 0) throw_python_error(emb);
    struct Release {
      Py_buffer* v;
      ~Release() { PyBuffer_Release(v); }
    } release{&view};
    if (view.ndim != 4 || view.itemsize != 1 || (view.format && std::strcmp(view.format, "B") != 0))
      throw Error(1, "TypeError", "block frames are not uint8 [frames, height, width, channels]");
    Block b;
    b.index = index;
    b.decision = decision;
    b.min_score = score;
    b.record_json = record;
    b.frames.data = static_cast<const std::uint8_t*>(view.buf);
    b.frames.frames = view.shape[0];
    b.frames.height = view.shape[1];
    b.frames.width = view.shape[2];
    b.frames.channels = view.shape[3];
    if (on_block) {
      NoGil nogil;  // the callback runs without the GIL; the buffer stays held
      on_block(b);
    }
    if (impl_->cancel.load())
      throw CancelledError("CancelledError", "generation cancelled after block " + std::to_string(index) +
                                                 " (Runtime::cancel); no further blocks were generated");
  }
  Ref st(PyObject_CallMethod(emb, "stats", "O", impl_->runtime));
  const char* json = nullptr;
  Stats out;
  long long frames = 0;
  if (!st || !PyArg_ParseTuple(st.get(), "sddLi", &json, &out.acceptance_rate, &out.wall_time_s, &frames, &out.blocks))
    throw_python_error(emb);
  out.json = json;
  out.frames = frames;
  return out;
}

void Runtime::cancel() noexcept {
  if (impl_->generating.load()) impl_->cancel = true;
}

bool Runtime::busy() const noexcept { return impl_->generating.load(); }
std::string Runtime::device() const { return impl_->device; }
std::string Runtime::profile_name() const { return impl_->profile; }

// ---- Prompt -----------------------------------------------------------------------------------------
Prompt::Prompt(Prompt&& o) noexcept : handle_(o.handle_), text_(std::move(o.text_)) { o.handle_ = nullptr; }

Prompt& Prompt::operator=(Prompt&& o) noexcept {
  if (this != &o) {
    std::swap(handle_, o.handle_);
    std::swap(text_, o.text_);
  }
  return *this;
}

Prompt::~Prompt() {
  if (handle_ == nullptr || !Py_IsInitialized()) return;
  Gil gil;
  Py_DECREF(static_cast<PyObject*>(handle_));
}

// ---- free functions ---------------------------------------------------------------------------------
std::string version() {
  ensure_interpreter();
  Gil gil;
  Ref mod(PyImport_ImportModule("sdvg_rt"));
  Ref v(mod ? PyObject_GetAttrString(mod.get(), "__version__") : nullptr);
  if (!v) throw_python_error(nullptr);
  return str_of(v.get());
}

void finalize() {
  if (!g_owned || !Py_IsInitialized()) return;
  PyGILState_Ensure();
  Py_FinalizeEx();
}

}  // namespace sdvg
