// sgengine-bench-overhead BUNDLE INDEX DESCRIPTOR.f32 [-n N] [-k K] [--warmup W] [--no-rerank]
//
// Times N calls of Engine::search_descriptor on one precomputed descriptor (raw float32 file)
// and prints one JSON line: the median wall time of a call, and the median of (wall time minus
// the engine's own "total" timing), which is the cost of crossing from C++ into Python and back
// (GIL, argument and result conversion) with the search itself taken out.
// bench/bench_cpp_overhead.py runs it beside the same call made from Python.
#include <sgengine/engine.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    int n = 2000, k = 10, warmup = 50;
    sgengine::SearchOptions so;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-n" && i + 1 < argc) n = std::atoi(argv[++i]);
        else if (a == "-k" && i + 1 < argc) k = std::atoi(argv[++i]);
        else if (a == "--warmup" && i + 1 < argc) warmup = std::atoi(argv[++i]);
        else if (a == "--no-rerank") so.rerank = false;
        else pos.push_back(a);
    }
    if (pos.size() != 3 || n <= 0) {
        std::cerr << "usage: " << argv[0] << " BUNDLE INDEX DESCRIPTOR.f32 [-n N] [-k K] [--warmup W] [--no-rerank]\n";
        return 2;
    }
    std::ifstream f(pos[2], std::ios::binary | std::ios::ate);
    if (!f) {
        std::cerr << pos[2] << ": cannot open the descriptor file\n";
        return 2;
    }
    std::vector<float> d(static_cast<size_t>(f.tellg()) / sizeof(float));
    f.seekg(0);
    f.read(reinterpret_cast<char*>(d.data()), static_cast<std::streamsize>(d.size() * sizeof(float)));
    try {
        sgengine::Options opt;
        opt.index_path = pos[1];
        sgengine::Engine engine(pos[0], opt);
        for (int i = 0; i < warmup; ++i) engine.search_descriptor(d.data(), d.size(), k, so);
        std::vector<double> wall, outside;
        wall.reserve(n);
        outside.reserve(n);
        for (int i = 0; i < n; ++i) {
            auto t0 = std::chrono::steady_clock::now();
            sgengine::Result r = engine.search_descriptor(d.data(), d.size(), k, so);
            double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
            wall.push_back(us);
            outside.push_back(us - r.timings_ms.at("total") * 1e3);
        }
        std::printf("{\"calls\": %d, \"median_us\": %.3f, \"median_outside_engine_us\": %.3f}\n", n, median(wall),
                    median(outside));
    } catch (const sgengine::Error& e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
    return 0;
}
