// Host-side choice of the tensor-core score pass's keys per CTA: a pure function (no CUDA), so
// the CPU tests compile and check it against the H200 measurements (tests/ops/test_kcache_attention.py).
#pragma once
#include <stdint.h>

namespace kvc {

// Keys per tensor-core score CTA for `rows` (b, KV head, head tile) rows of S keys on a GPU
// with `slots` score CTAs resident at once (kvc::score_slots): for a grid under half a wave
// the smallest multiple of 256 whose grid still fits one wave, 2048 up to one wave (and when
// slots is unknown), else the multiple of 256 in [1024, 4096] whose grid wastes the least of
// its last wave.
inline int choose_score_tile(int64_t rows, int S, int slots) {
  constexpr int kDefault = 2048;
  // A CTA's own cost (query load, statistics fold, launch) in keys' worth of reading: fitted
  // to the H200's 1024- and 2048-key timings at 32K, B=8 (6 and 3 waves: 163.8 and 156.8 µs).
  constexpr double kCtaOverheadKeys = 96.0;
  if (slots <= 0 || rows <= 0) return kDefault;
  const int64_t default_ctas = rows * ((S + kDefault - 1) / kDefault);
  // Under half a wave the pass is short of loads in flight: as many CTAs as one wave holds, each
  // with fewer keys (H200, tenth session: B=1 8K 256 keys 7.7 µs against 15.3 at 1024 and 25.3
  // at 2048; B=2 8K 512 keys 11.0 against 14.5 at 256, whose grid is 1.3 waves; B=1 32K 768
  // keys 24.2). Between half a wave and one, the grid already saturates HBM (B=8, 8K, 256
  // CTAs: 2048 keys 41.6 µs, 1536 keys 42.8).
  if (default_ctas * 2 < slots) {
    for (int tile = 256; tile < kDefault; tile += 256)
      if (rows * ((S + tile - 1) / tile) <= slots) return tile;
    return kDefault;
  }
  if (default_ctas < slots) return kDefault;
  // A wave or more: the tile whose last wave is fullest, every CTA taking about as long
  // (B=8, 32K: 2816 keys, 2 whole waves, 147.9 µs against 153.4 for 2048's 2.6 waves).
  int best = kDefault;
  double best_cost = 0.0;
  for (int tile = 1024; tile <= 4096; tile += 256) {
    const int64_t ctas = rows * ((S + tile - 1) / tile);
    const int64_t waves = (ctas + slots - 1) / slots;
    const double cost = (double)waves * (tile + kCtaOverheadKeys);
    if (tile == 1024 || cost < best_cost || (cost == best_cost && tile == kDefault)) {
      best = tile;
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace kvc
