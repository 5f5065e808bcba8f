// Test program for the C++ API; tests/cpp/check_api.py runs it and compares what it prints with
// the same calls made in Python.
//
//   embed_check FIXTURE_DIR K            every entry point, errors, describe(), two threads
//   embed_check FIXTURE_DIR K --describe only describe() (used with SGENGINE_PYTHON = a venv)
//
// FIXTURE_DIR is what tests/cpp/make_fixture.py writes (bundle/, index/, query.jpg, query.rgb,
// query.json with its height and width, query.f32). Output lines:
//   result MODE RANK SCORE ROW ID
//   error CASE PYTHON_TYPE
//   describe JSON
//   threads ok N
// Exit status is non-zero when the thread check fails (results differ from the single-threaded
// ones) or anything unexpected is thrown.
#include <sgengine/engine.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

std::vector<uint8_t> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot open");
    return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

int json_int(const std::string& json, const std::string& key) {
    auto p = json.find("\"" + key + "\"");
    if (p == std::string::npos) throw std::runtime_error("query.json has no " + key);
    p = json.find(':', p);
    return std::atoi(json.c_str() + p + 1);
}

void print(const std::string& mode, const sgengine::Result& r) {
    for (size_t i = 0; i < r.hits.size(); ++i) {
        std::printf("result %s %zu %.9g %lld %s\n", mode.c_str(), i + 1, static_cast<double>(r.hits[i].score),
                    static_cast<long long>(r.hits[i].row), r.hits[i].id.c_str());
    }
}

void expect_error(const std::string& name, const std::function<void()>& f) {
    try {
        f();
        std::printf("error %s none\n", name.c_str());
    } catch (const sgengine::Error& e) {
        std::printf("error %s %s\n", name.c_str(), e.python_type().empty() ? "-" : e.python_type().c_str());
    }
}

bool same(const sgengine::Result& a, const sgengine::Result& b) {
    if (a.hits.size() != b.hits.size()) return false;
    for (size_t i = 0; i < a.hits.size(); ++i) {
        if (a.hits[i].id != b.hits[i].id || std::fabs(a.hits[i].score - b.hits[i].score) > 1e-5f) return false;
    }
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: embed_check FIXTURE_DIR K [--describe]\n";
        return 2;
    }
    const std::string dir = argv[1];
    const int k = std::atoi(argv[2]);
    const bool describe_only = argc > 3 && std::string(argv[3]) == "--describe";
    try {
        sgengine::Options opt;
        opt.index_path = dir + "/index";
        sgengine::Engine engine(dir + "/bundle", opt);
        std::printf("describe %s\n", engine.describe().c_str());
        if (describe_only) return 0;

        const std::string query = dir + "/query.jpg";
        const std::vector<uint8_t> encoded = read_file(query);
        const std::vector<uint8_t> rgb = read_file(dir + "/query.rgb");
        const std::vector<uint8_t> meta = read_file(dir + "/query.json");
        const std::string json(meta.begin(), meta.end());
        const int h = json_int(json, "height"), w = json_int(json, "width");
        std::vector<uint8_t> bgr(rgb);
        for (size_t i = 0; i + 2 < bgr.size(); i += 3) std::swap(bgr[i], bgr[i + 2]);
        const std::vector<uint8_t> desc_bytes = read_file(dir + "/query.f32");
        std::vector<float> desc(desc_bytes.size() / sizeof(float));
        std::copy(desc_bytes.begin(), desc_bytes.end(), reinterpret_cast<uint8_t*>(desc.data()));

        const sgengine::Result by_path = engine.search(query, k);
        print("path", by_path);
        print("encoded", engine.search_encoded(encoded.data(), encoded.size(), k));
        print("pixels_rgb", engine.search_pixels(rgb.data(), h, w, 3, sgengine::ColorOrder::RGB, k));
        print("pixels_bgr", engine.search_pixels(bgr.data(), h, w, 3, sgengine::ColorOrder::BGR, k));
        const sgengine::Result by_desc = engine.search_descriptor(desc.data(), desc.size(), k);
        print("descriptor", by_desc);
        sgengine::SearchOptions plain;
        plain.rerank = false;
        print("no_rerank", engine.search(query, k, plain));
        sgengine::SearchOptions adaptive;
        adaptive.adaptive = true;
        print("adaptive", engine.search(query, k, adaptive));
        plain.adaptive = true;  // no rerank wins over the mode
        print("no_rerank_adaptive", engine.search(query, k, plain));
        sgengine::SearchOptions custom;
        custom.M = 4;
        custom.K = 1;
        custom.beta = 0.3;
        print("custom", engine.search(query, k, custom));
        print("k_large", engine.search_descriptor(desc.data(), desc.size(), 100000));

        expect_error("missing_file", [&] { engine.search(dir + "/no-such-image.jpg", k); });
        expect_error("k_zero", [&] { engine.search_descriptor(desc.data(), desc.size(), 0); });
        expect_error("wrong_dim", [&] { engine.search_descriptor(desc.data(), desc.size() - 1, k); });
        const std::string junk = "this is not an image";
        expect_error("junk_bytes", [&] {
            engine.search_encoded(reinterpret_cast<const uint8_t*>(junk.data()), junk.size(), k);
        });
        expect_error("two_channels", [&] { engine.search_pixels(rgb.data(), h, w, 2, sgengine::ColorOrder::RGB, k); });
        expect_error("missing_bundle", [&] { sgengine::Engine(dir + "/no-such-bundle", opt); });
        expect_error("missing_index", [&] {
            sgengine::Options o;
            o.index_path = dir + "/no-such-index";
            sgengine::Engine(dir + "/bundle", o);
        });
        expect_error("no_index", [&] { sgengine::Engine(dir + "/bundle").search(query, k); });

        // Two threads at once: one searching images on `engine`, the other building a second
        // Engine (same interpreter) and searching descriptors on both. Each result must equal the
        // single-threaded one above.
        const int rounds = 2;
        bool ok_a = true, ok_b = true;
        std::string err_a, err_b;
        std::thread a([&] {
            try {
                for (int i = 0; i < rounds; ++i) ok_a = same(engine.search(query, k), by_path) && ok_a;
            } catch (const std::exception& e) {
                ok_a = false;
                err_a = e.what();
            }
        });
        std::thread b([&] {
            try {
                sgengine::Engine second(dir + "/bundle", opt);
                for (int i = 0; i < rounds; ++i) {
                    ok_b = same(second.search_descriptor(desc.data(), desc.size(), k), by_desc) && ok_b;
                    ok_b = same(engine.search_descriptor(desc.data(), desc.size(), k), by_desc) && ok_b;
                }
            } catch (const std::exception& e) {
                ok_b = false;
                err_b = e.what();
            }
        });
        a.join();
        b.join();
        if (!ok_a || !ok_b) {
            std::fprintf(stderr, "threads: results differ from the single-threaded ones or failed (%s | %s)\n",
                         err_a.c_str(), err_b.c_str());
            return 1;
        }
        std::printf("threads ok %d\n", 3 * rounds);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "embed_check: %s\n", e.what());
        return 1;
    }
    return 0;
}
