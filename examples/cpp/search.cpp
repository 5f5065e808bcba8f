// sgengine-search BUNDLE INDEX QUERY [-k N] [--no-rerank | --adaptive] [--device cpu|cuda] [--backend NAME]
//
// Ranks INDEX for the image QUERY and prints the top k as "rank id score" lines (stdout); the
// per-stage timings and any notes go to stderr.
#include <sgengine/engine.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

static int usage(const char* argv0) {
    std::cerr << "usage: " << argv0
              << " BUNDLE INDEX QUERY [-k N] [--no-rerank | --adaptive] [--device cpu|cuda] [--backend NAME]\n";
    return 2;
}

int main(int argc, char** argv) {
    std::vector<std::string> positional;
    int k = 10;
    sgengine::Options options;
    sgengine::SearchOptions search;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto value = [&](const char* flag) -> std::string {
            if (i + 1 >= argc) {
                std::cerr << flag << " needs a value\n";
                std::exit(usage(argv[0]));
            }
            return argv[++i];
        };
        if (a == "-k") {
            std::string v = value("-k");
            char* end = nullptr;
            long n = std::strtol(v.c_str(), &end, 10);
            if (end == v.c_str() || *end != '\0') {
                std::cerr << "-k: not an integer: " << v << "\n";
                return usage(argv[0]);
            }
            k = static_cast<int>(n);  // k <= 0 is reported by the engine, as in Python
        } else if (a == "--no-rerank") {
            search.rerank = false;
        } else if (a == "--adaptive") {
            search.adaptive = true;  // the adaptive rerank (docs/adaptive_rerank.md)
        } else if (a == "--device") {
            options.device = value("--device");
        } else if (a == "--backend") {
            options.backend = value("--backend");
        } else if (a == "-h" || a == "--help") {
            usage(argv[0]);
            return 0;
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() != 3) return usage(argv[0]);
    options.index_path = positional[1];
    try {
        sgengine::Engine engine(positional[0], options);
        sgengine::Result r = engine.search(positional[2], k, search);
        for (size_t i = 0; i < r.hits.size(); ++i) {
            // %.9g: every float32 score round-trips exactly.
            std::printf("%zu %s %.9g\n", i + 1, r.hits[i].id.c_str(), static_cast<double>(r.hits[i].score));
        }
        std::fprintf(stderr, "timings (ms):");
        for (const auto& [stage, ms] : r.timings_ms) std::fprintf(stderr, " %s %.1f", stage.c_str(), ms);
        std::fprintf(stderr, "\n");
        for (const auto& n : r.notes) std::fprintf(stderr, "note: %s\n", n.c_str());
    } catch (const sgengine::Error& e) {
        std::cerr << "sgengine-search: " << e.what() << "\n";
        return 1;
    }
    return 0;
}
