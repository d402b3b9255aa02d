// Embedding sdvg-rt in a C++ service: start CPython, build a Runtime once, stream a video block by block.
//
//   ./embed_demo [profile.yaml] [prompt] [device]
//
// The program links libpython (python3-config --embed) and calls the public Python API:
//   rt = sdvg_rt.Runtime.from_profile(profile, device)
//   for block in rt.stream(prompt): ...        # BlockOutput(block, frames uint8 [f, H, W, 3], record)
// Frames are read in place through the buffer protocol (no copy, no numpy C API). Errors from the runtime
// are typed (sdvg_rt.SdvgError subclasses); their exit_code becomes this program's exit status.
#include <Python.h>

#include <cstdio>
#include <string>

#ifndef SDVG_PYTHON
#define SDVG_PYTHON ""  // the interpreter whose environment (venv, site-packages) to use; set by the build
#endif

namespace {

// A tiny owning reference so every early return releases what it holds.
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  ~Ref() { Py_XDECREF(p); }
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  operator PyObject*() const { return p; }
  explicit operator bool() const { return p != nullptr; }
};

// Print the pending Python exception in one paragraph; return its exit_code (SdvgError) or 1.
int report_error(const char* what) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  int code = 1;
  std::string msg = "unknown error";
  if (value) {
    Ref s(PyObject_Str(value));
    if (s) msg = PyUnicode_AsUTF8(s);
    Ref ec(PyObject_GetAttrString(value, "exit_code"));
    if (ec && PyLong_Check(ec)) code = static_cast<int>(PyLong_AsLong(ec));
    PyErr_Clear();
  }
  const char* name = type ? reinterpret_cast<PyTypeObject*>(type)->tp_name : "Error";
  std::fprintf(stderr, "embed_demo: %s failed: %s: %s\n", what, name, msg.c_str());
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  return code;
}

double get_float(PyObject* obj, const char* key, double fallback) {
  PyObject* v = PyDict_GetItemString(obj, key);  // borrowed
  return (v && PyFloat_Check(v)) ? PyFloat_AsDouble(v) : fallback;
}

int run(const char* profile, const char* prompt, const char* device) {
  // 1. import the package and build the runtime (loads the weights once)
  Ref mod(PyImport_ImportModule("sdvg_rt"));
  if (!mod) return report_error("import sdvg_rt");
  Ref runtime_cls(PyObject_GetAttrString(mod, "Runtime"));
  if (!runtime_cls) return report_error("sdvg_rt.Runtime");
  Ref from_profile(PyObject_GetAttrString(runtime_cls, "from_profile"));
  Ref args(Py_BuildValue("(ss)", profile, device));
  Ref rt(from_profile ? PyObject_Call(from_profile, args, nullptr) : nullptr);
  if (!rt) return report_error("Runtime.from_profile");

  // 2. stream one video: each committed block arrives with its uint8 frames and its record
  Ref gen(PyObject_CallMethod(rt, "stream", "s", prompt));
  if (!gen) return report_error("Runtime.stream");
  long total_frames = 0;
  long height = 0, width = 0;
  unsigned long long checksum = 0;
  while (true) {
    Ref block(PyIter_Next(gen));
    if (!block) {
      if (PyErr_Occurred()) return report_error("generation");
      break;
    }
    Ref index(PyObject_GetAttrString(block, "block"));
    Ref frames(PyObject_GetAttrString(block, "frames"));
    Ref record(PyObject_GetAttrString(block, "record"));
    Ref decision(record ? PyObject_GetAttrString(record, "decision") : nullptr);
    if (!index || !frames || !decision) return report_error("reading a block");
    Py_buffer view;  // frames: C-contiguous uint8 [f, H, W, 3], read in place
    if (PyObject_GetBuffer(frames, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_ND) != 0)
      return report_error("frames buffer");
    const auto* px = static_cast<const unsigned char*>(view.buf);
    for (Py_ssize_t i = 0; i < view.len; i += 997) checksum += px[i];
    long f = static_cast<long>(view.shape[0]);
    height = static_cast<long>(view.shape[1]);
    width = static_cast<long>(view.shape[2]);
    PyBuffer_Release(&view);
    total_frames += f;
    std::printf("block %ld: %s, %ld frames\n", PyLong_AsLong(index), PyUnicode_AsUTF8(decision), f);
  }

  // 3. the video's statistics (the same dict the CLI writes as JSON)
  Ref stats(PyObject_GetAttrString(rt, "last_stats"));
  if (!stats) return report_error("last_stats");
  double acc = get_float(stats, "acceptance_rate", -1.0);
  double wall = get_float(stats, "wall_time_s", 0.0);
  std::printf("frames: %ld (%ldx%ld)\n", total_frames, width, height);
  if (acc >= 0)
    std::printf("acceptance: %.3f\n", acc);
  else
    std::printf("acceptance: n/a\n");
  std::printf("wall time: %.2f s, checksum %llu\n", wall, checksum);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* profile = argc > 1 ? argv[1] : "profiles/tiny.yaml";
  const char* prompt = argc > 2 ? argv[2] : "a red fox running through fresh snow";
  const char* device = argc > 3 ? argv[3] : "cpu";

  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.parse_argv = 0;
  config.install_signal_handlers = 1;  // Ctrl-C raises KeyboardInterrupt inside the runtime
  if (SDVG_PYTHON[0] != '\0') {
    // Compute sys.prefix / site-packages as this interpreter would (finds a venv's pyvenv.cfg).
    PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, SDVG_PYTHON);
    if (PyStatus_Exception(st)) {
      PyConfig_Clear(&config);
      Py_ExitStatusException(st);
    }
  }
  PyStatus status = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(status)) Py_ExitStatusException(status);

  int code = run(profile, prompt, device);
  if (Py_FinalizeEx() < 0 && code == 0) code = 120;
  return code;
}
