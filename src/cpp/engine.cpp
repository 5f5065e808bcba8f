// The embedding layer: one CPython interpreter per process, GIL held only inside Python calls,
// Python exceptions turned into sgengine::Error. See include/sgengine/engine.hpp for the contract.
#include "sgengine/engine.hpp"

#include <pybind11/embed.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>

#ifndef SGENGINE_DEFAULT_PYTHON
#error "SGENGINE_DEFAULT_PYTHON (the environment's python executable) must be defined by the build"
#endif

namespace py = pybind11;

namespace sgengine {

std::string python_executable() {
    const char* env = std::getenv("SGENGINE_PYTHON");
    return (env != nullptr && *env != '\0') ? std::string(env) : std::string(SGENGINE_DEFAULT_PYTHON);
}

namespace {

// Must run with the GIL held (inside a catch block of call_python).
Error from_python(const py::error_already_set& e) {
    std::string type, message, tb;
    try {
        type = py::str(e.type().attr("__name__"));
        message = py::str(e.value());
        if (e.trace()) {
            py::object fmt = py::module_::import("traceback").attr("format_exception");
            tb = py::str(py::str("").attr("join")(fmt(e.type(), e.value(), e.trace())));
        }
    } catch (const std::exception&) {
        if (type.empty()) type = "Exception";
        if (message.empty()) message = e.what();
    }
    return Error(std::move(type), std::move(message), std::move(tb));
}

// The interpreter, started once by the first Engine (thread-safe: a function-local static) and
// never finalized: finalizing during static destruction would race with torch's and ONNX
// Runtime's own threads, and neither supports a second initialization.
class Interpreter {
public:
    static const Interpreter& get() {
        // Heap-allocated and leaked on purpose, so no destructor runs at exit (see above).
        static const Interpreter* instance = new Interpreter();
        if (!instance->error_.empty()) throw Error("", instance->error_);
        return *instance;
    }

private:
    Interpreter() {
        if (Py_IsInitialized() != 0) {
            return;  // loaded into a process that already runs Python: use that interpreter as it is
        }
        const std::string exe = python_executable();
        struct stat st {};
        if (::stat(exe.c_str(), &st) != 0) {
            error_ = "python executable " + exe + " does not exist: set SGENGINE_PYTHON to the python of the "
                     "environment sgengine is installed in (e.g. /path/to/venv/bin/python)";
            return;
        }
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        // The host program owns SIGINT; Python's handler would only set a flag nobody checks.
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        // program_name and executable make Python's getpath compute sys.prefix from this python:
        // a virtual environment's pyvenv.cfg is found next to it, so its site-packages (and an
        // editable install's finder) are on sys.path without PYTHONHOME or PYTHONPATH.
        PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, exe.c_str());
        if (!PyStatus_Exception(status)) {
            status = PyConfig_SetBytesString(&config, &config.executable, exe.c_str());
        }
        if (PyStatus_Exception(status)) {
            PyConfig_Clear(&config);
            error_ = "cannot configure Python from " + exe + ": " + (status.err_msg ? status.err_msg : "unknown");
            return;
        }
        try {
            // add_program_dir_to_path=false: the host's working directory must not shadow packages.
            py::initialize_interpreter(&config, 0, nullptr, false);  // clears config
        } catch (const std::exception& e) {
            error_ = std::string("cannot start Python from ") + exe + " (this library was built against Python " +
                     PY_VERSION + "; the environment must use the same version): " + e.what();
            return;
        }
        // Release the GIL for good on this thread: every call re-acquires it only for its Python part,
        // so other C++ threads are never blocked by this one.
        PyEval_SaveThread();
    }

    std::string error_;
};

// Runs f with the GIL held and turns every failure into sgengine::Error.
template <class F>
auto call_python(F&& f) -> decltype(f()) {
    py::gil_scoped_acquire gil;
    try {
        return f();
    } catch (const Error&) {
        throw;
    } catch (py::error_already_set& e) {
        throw from_python(e);
    } catch (const py::cast_error& e) {
        throw Error("TypeError", std::string("unexpected result type from sgengine: ") + e.what());
    } catch (const std::exception& e) {
        throw Error("RuntimeError", e.what());
    }
}

py::object optional_or_none(const std::optional<int>& v) { return v ? py::object(py::int_(*v)) : py::none(); }
py::object optional_or_none(const std::optional<double>& v) { return v ? py::object(py::float_(*v)) : py::none(); }

}  // namespace

struct Engine::Impl {
    py::object engine;     // sgengine.engine.Engine
    size_t dim = 0;

    ~Impl() {
        if (!engine) return;
        if (Py_IsInitialized() == 0) {
            engine.release();  // Python is gone (host finalized it): nothing left to free
            return;
        }
        py::gil_scoped_acquire gil;
        engine = py::object();
    }

    Result run(py::object query, int k, const SearchOptions& o, const char* color_order = "RGB") const {
        // Python's rerank argument: False, True (faithful) or "adaptive".
        py::object rerank = !o.rerank ? py::object(py::bool_(false))
                            : o.adaptive ? py::object(py::str("adaptive")) : py::object(py::bool_(true));
        py::object res = engine.attr("search")(query, py::arg("k") = k, py::arg("rerank") = rerank,
                                               py::arg("M") = optional_or_none(o.M),
                                               py::arg("K") = optional_or_none(o.K),
                                               py::arg("beta") = optional_or_none(o.beta),
                                               py::arg("color_order") = color_order);
        Result out;
        // One query per call: the result's first (only) row.
        py::object first = res.attr("__getitem__")(0);
        py::list ids = first.attr("ids");
        auto rows = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(first.attr("rows"));
        auto scores = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(first.attr("scores"));
        if (!rows || !scores || rows.ndim() != 1 || scores.ndim() != 1 ||
            static_cast<size_t>(rows.size()) != ids.size() || static_cast<size_t>(scores.size()) != ids.size()) {
            throw Error("TypeError", "sgengine returned a result that is not one ranked list (ids/rows/scores differ)");
        }
        const int64_t* r = rows.data();
        const float* s = scores.data();
        out.hits.reserve(ids.size());
        for (size_t i = 0; i < ids.size(); ++i) {
            out.hits.push_back(Hit{std::string(py::str(ids[i])), s[i], r[i]});
        }
        for (auto item : py::dict(res.attr("timings"))) {
            out.timings_ms[std::string(py::str(item.first))] = item.second.cast<double>();
        }
        for (auto n : py::list(res.attr("notes"))) {
            out.notes.emplace_back(std::string(py::str(n)));
        }
        return out;
    }
};

Engine::Engine(const std::string& bundle_path, const Options& options) : impl_(std::make_unique<Impl>()) {
    Interpreter::get();
    call_python([&] {
        py::object mod;
        try {
            mod = py::module_::import("sgengine.engine");
        } catch (py::error_already_set& e) {
            if (!e.matches(PyExc_ImportError)) throw;
            py::module_ sys = py::module_::import("sys");
            Error base = from_python(e);
            throw Error(base.python_type(),
                        base.message() + " (sgengine is not importable by the embedded Python: executable " +
                            std::string(py::str(sys.attr("executable"))) + ", sys.prefix " +
                            std::string(py::str(sys.attr("prefix"))) +
                            "; install sgengine in that environment or point SGENGINE_PYTHON at the python of the "
                            "environment that has it)",
                        base.traceback());
        }
        py::object index = options.index_path.empty() ? py::object(py::none()) : py::object(py::str(options.index_path));
        impl_->engine = mod.attr("Engine").attr("load")(bundle_path, py::arg("index") = index,
                                                         py::arg("device") = options.device,
                                                         py::arg("backend") = options.backend);
        impl_->dim = impl_->engine.attr("dim").cast<size_t>();
    });
}

Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

// A template so that it can take the private Impl type by deduction.
template <class T>
static const T& checked(const std::unique_ptr<T>& impl) {
    if (!impl) throw Error("InputError", "this sgengine::Engine was moved from");
    return *impl;
}

Result Engine::search(const std::string& image_path, int k, const SearchOptions& options) const {
    const Impl& impl = checked(impl_);
    return call_python([&] { return impl.run(py::str(image_path), k, options); });
}

Result Engine::search_encoded(const uint8_t* data, size_t size, int k, const SearchOptions& options) const {
    const Impl& impl = checked(impl_);
    if (data == nullptr && size != 0) throw Error("InputError", "encoded image: data is null but size is " + std::to_string(size));
    return call_python([&] {
        return impl.run(py::bytes(reinterpret_cast<const char*>(data), size), k, options);
    });
}

Result Engine::search_pixels(const uint8_t* hwc, int height, int width, int channels, ColorOrder order, int k,
                             const SearchOptions& options) const {
    const Impl& impl = checked(impl_);
    // Only what the copy below needs; which channel counts are images is Python's to decide.
    if (hwc == nullptr || height <= 0 || width <= 0 || channels <= 0) {
        throw Error("InputError", "pixels: need a non-null buffer of height x width x channels, all positive (got " +
                                      std::to_string(height) + "x" + std::to_string(width) + "x" +
                                      std::to_string(channels) + ")");
    }
    return call_python([&] {
        // A copy, not a view of the caller's buffer: the engine may keep or modify its input array,
        // and a copy costs ~1 ms per 10 MB against a backbone pass of tens of milliseconds.
        std::vector<py::ssize_t> shape{height, width};
        if (channels != 1) shape.push_back(channels);
        py::array_t<uint8_t> a(shape);
        std::memcpy(a.mutable_data(), hwc, static_cast<size_t>(height) * width * channels);
        return impl.run(a, k, options, order == ColorOrder::BGR ? "BGR" : "RGB");
    });
}

Result Engine::search_descriptor(const float* descriptor, size_t dim, int k, const SearchOptions& options) const {
    const Impl& impl = checked(impl_);
    if (descriptor == nullptr) throw Error("InputError", "descriptor: null pointer");
    return call_python([&] {
        // Copied because torch.as_tensor warns on (and must not write through) a read-only view.
        py::array_t<float> a(static_cast<py::ssize_t>(dim));
        std::memcpy(a.mutable_data(), descriptor, dim * sizeof(float));
        return impl.run(a, k, options);
    });
}

std::string Engine::describe() const {
    const Impl& impl = checked(impl_);
    return call_python([&] {
        py::module_ sys = py::module_::import("sys");
        py::dict d(impl.engine.attr("describe")());
        py::dict emb;
        emb["python"] = sys.attr("executable");
        emb["prefix"] = sys.attr("prefix");
        emb["version"] = sys.attr("version").attr("split")().attr("__getitem__")(0);
        d["embedding"] = emb;
        py::object dumps = py::module_::import("json").attr("dumps");
        return std::string(py::str(dumps(d, py::arg("default") = py::module_::import("builtins").attr("str"))));
    });
}

size_t Engine::dim() const { return checked(impl_).dim; }

}  // namespace sgengine
