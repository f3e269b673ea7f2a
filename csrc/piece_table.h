// The table of gradient pieces csrc/adamw.cu's kernels take in their parameters (its `Pieces`, laid out the
// same), and how a list of pieces is cut into launches. Shared by csrc/kernels.cpp and the CPU emulation of the
// kernels (tests/kernels/emulate.cpp), so the emulation checks the cutting too. No ATen, no CUDA.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace tessera_kernels {

constexpr int kMaxPieces = 48;  // adamw.cu's MAX_PIECES

struct PieceTable {
    uint64_t grad[kMaxPieces];
    int64_t offset[kMaxPieces];
    int64_t numel[kMaxPieces];
    int first_block[kMaxPieces + 1];
    int bf16[kMaxPieces];
    int count;
};
static_assert(sizeof(PieceTable) == 8 * 3 * kMaxPieces + 4 * (2 * kMaxPieces + 2), "PieceTable must match adamw.cu");

// One piece: a gradient's address, where it starts in the flat range, its length, and whether it is bf16
// (else fp32).
struct PieceRef {
    uint64_t grad;
    int64_t offset;
    int64_t numel;
    bool bf16;
};

// `pieces` cut into launches of at most kMaxPieces pieces (and fewer than 2^31 blocks), each with its block
// count, where every block takes `chunk` elements of one piece. Empty pieces are left out.
inline std::vector<std::pair<PieceTable, int64_t>> piece_tables(const std::vector<PieceRef>& pieces, int64_t chunk) {
    std::vector<std::pair<PieceTable, int64_t>> tables;
    PieceTable t{};
    int64_t blocks = 0;
    auto flush = [&] {
        if (t.count == 0) return;
        t.first_block[t.count] = static_cast<int>(blocks);
        tables.emplace_back(t, blocks);
        t = PieceTable{};
        blocks = 0;
    };
    for (const auto& p : pieces) {
        if (p.numel == 0) continue;
        int64_t need = (p.numel + chunk - 1) / chunk;
        if (t.count == kMaxPieces || blocks + need > INT32_MAX) flush();
        t.grad[t.count] = p.grad;
        t.offset[t.count] = p.offset;
        t.numel[t.count] = p.numel;
        t.bf16[t.count] = p.bf16 ? 1 : 0;
        t.first_block[t.count] = static_cast<int>(blocks);
        t.count++;
        blocks += need;
    }
    flush();
    return tables;
}

}  // namespace tessera_kernels
