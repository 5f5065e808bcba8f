// sgengine from C++: the Python engine (sgengine.Engine) behind a small C++ interface.
//
//     #include <sgengine/engine.hpp>
//     sgengine::Engine engine("bundle/", {"index/"});
//     sgengine::Result r = engine.search("query.jpg", 10);
//     for (const auto& h : r.hits) std::cout << h.id << " " << h.score << "\n";
//
// The first Engine in a process starts an embedded CPython interpreter (pybind11) configured from
// the python of the environment sgengine is installed in: the one CMake found at configure time,
// or the one named by the environment variable SGENGINE_PYTHON at run time. Later Engines share
// it. The interpreter is never finalized (torch and ONNX Runtime cannot be re-initialized in one
// process), so it lives until the process exits.
//
// Threads: every call takes the GIL only while it is in Python; the backbone and the kernels
// release it while they run, so several threads may call one Engine (or several) at once.
//
// This header does not include Python or pybind11: a program using it needs neither's headers,
// only the sgengine_embed library (which links the Python shared library) at link and run time.
//
// Deployment needs, on the target machine:
//   - libsgengine_embed.so and the shared library of the same Python it was built against
//     (libpython3.X.so, same minor version; found through the RPATH recorded at build/install
//     time, else through LD_LIBRARY_PATH);
//   - a Python environment of that version with sgengine and its dependencies installed (a venv
//     is fine): the build machine's by default, else SGENGINE_PYTHON=/path/to/env/bin/python.
// PYTHONHOME and PYTHONPATH are not needed, and if set they override what the environment gives
// (Python reads them at start-up), so leave them unset. The library must be loaded with its
// symbols global (a normal link, or dlopen with RTLD_GLOBAL): Python extension modules such as
// numpy and torch resolve the Python C API from it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(_WIN32)
#  if defined(SGENGINE_EMBED_BUILDING)
#    define SGENGINE_API __declspec(dllexport)
#  else
#    define SGENGINE_API __declspec(dllimport)
#  endif
#else
#  define SGENGINE_API __attribute__((visibility("default")))
#endif

namespace sgengine {

// Every failure, as the Python exception that caused it: python_type() is the exception's class
// name ("InputError", "ImageDecodeError", "IndexMismatchError", "ModuleNotFoundError"...), message()
// its str(). python_type() is empty only when Python itself could not be started.
class SGENGINE_API Error : public std::runtime_error {
public:
    Error(std::string python_type, std::string message, std::string traceback = {})
        : std::runtime_error(python_type.empty() ? message : python_type + ": " + message),
          type_(std::move(python_type)), message_(std::move(message)), traceback_(std::move(traceback)) {}

    const std::string& python_type() const noexcept { return type_; }
    const std::string& message() const noexcept { return message_; }
    // The formatted Python traceback (empty when there is none): for logs, not for matching.
    const std::string& traceback() const noexcept { return traceback_; }

private:
    std::string type_, message_, traceback_;
};

struct Options {
    std::string index_path;          // empty: no index (search() then raises InputError)
    std::string device = "cpu";      // "cpu" or "cuda"
    std::string backend = "auto";    // "auto", "onnxruntime", "torch" or "tensorrt"
};

// Rerank settings of one call; unset values take the bundle's defaults (M=400, K=9, beta=0.15).
struct SearchOptions {
    bool rerank = true;              // false: global-only ranking
    bool adaptive = false;           // with rerank: the adaptive mode (docs/adaptive_rerank.md), for
                                     // collections with few matches per query; false: SPEC 6 as published
    std::optional<int> M;
    std::optional<int> K;
    std::optional<double> beta;
};

enum class ColorOrder { RGB, BGR };

struct Hit {
    std::string id;    // the external id stored in the index (path relative to the indexed folder)
    float score;
    int64_t row;       // position in the index
};

struct Result {
    std::vector<Hit> hits;                       // best first
    std::map<std::string, double> timings_ms;    // per stage, as sgengine.SearchResult.timings
    std::vector<std::string> notes;              // what was adjusted (k clamped, image upscaled...)
};

class SGENGINE_API Engine {
public:
    // Loads the bundle (verifying it) and opens the index: sgengine.Engine.load(bundle, index, device, backend).
    explicit Engine(const std::string& bundle_path, const Options& options = {});
    ~Engine();
    Engine(Engine&&) noexcept;
    Engine& operator=(Engine&&) noexcept;
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    // An image file (any format Pillow decodes).
    Result search(const std::string& image_path, int k = 100, const SearchOptions& options = {}) const;
    // An encoded image in memory (JPEG, PNG, ... bytes).
    Result search_encoded(const uint8_t* data, size_t size, int k = 100, const SearchOptions& options = {}) const;
    // Decoded uint8 pixels, row-major height x width x channels, no row padding; channels 1 (grey), 3 or
    // 4 (alpha dropped), as sgengine.Engine takes numpy arrays; order says how 3/4 channels are laid out.
    Result search_pixels(const uint8_t* hwc, int height, int width, int channels, ColorOrder order, int k = 100,
                         const SearchOptions& options = {}) const;
    // A precomputed descriptor of dim() floats (as Engine.embed returns).
    Result search_descriptor(const float* descriptor, size_t dim, int k = 100,
                             const SearchOptions& options = {}) const;

    // engine.describe() as JSON, plus an "embedding" block (python executable, prefix, version).
    std::string describe() const;
    // The descriptor dimension of the bundle.
    size_t dim() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// The python executable the embedded interpreter is (or will be) configured from:
// $SGENGINE_PYTHON if set, else the one baked in at build time.
SGENGINE_API std::string python_executable();

}  // namespace sgengine
