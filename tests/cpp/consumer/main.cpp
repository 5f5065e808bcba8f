// consumer_search BUNDLE INDEX QUERY -k N: prints "rank id score" lines, as sgengine-search does.
#include <sgengine/engine.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
    if (argc != 6 || std::string(argv[4]) != "-k") {
        std::fprintf(stderr, "usage: %s BUNDLE INDEX QUERY -k N\n", argv[0]);
        return 2;
    }
    try {
        sgengine::Engine engine(argv[1], sgengine::Options{argv[2]});
        auto r = engine.search(argv[3], std::atoi(argv[5]));
        for (size_t i = 0; i < r.hits.size(); ++i)
            std::printf("%zu %s %.9g\n", i + 1, r.hits[i].id.c_str(), static_cast<double>(r.hits[i].score));
    } catch (const sgengine::Error& e) {
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return 0;
}
