// The keyed layout of group_advantages: raw group ids (int32 or int64) numbered into dense keys
// (a byte map of the ids present when they span a small range, else a hash table), with their
// min / max pass compiled per ISA. Included by csrc/cpu/group_advantages.cpp only.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include <omp.h>

#include "cpu/isa.h"
#include "cpu/segment_scratch.h"

namespace fusedrl {
namespace cpu {
namespace {

// ---- the keyed layout ----

// id - lo as an index, for id in [lo, lo + range]: int64 ids in 64-bit arithmetic; 32-bit ids
// (int32 ids, or the low 32 bits of int64 ids when range < 2^32) modulo 2^32, exact for any
// range < 2^32.
FUSEDRL_HD uint64_t id_offset(int64_t id, uint64_t lo) { return uint64_t(id) - lo; }
FUSEDRL_HD uint64_t id_offset(int32_t id, uint64_t lo) { return uint32_t(id) - uint32_t(lo); }

// The dense key (group) of row r of raw ids: number[id_r - lo] (int32), looked up by pass 1 as it
// reads the row (rows_with_keys). Id: the type the ids are read as (int32 or int64).
template <typename Id>
struct Keys {
  const Id* ids;
  int64_t stride;
  uint64_t lo;
  const int32_t* number;
  int64_t operator()(int64_t r) const { return number[id_offset(ids[r * stride], lo)]; }
};

// Where the dense keys come from (make_keys): raw ids (int32 or int64), or the low 32 bits of
// int64 ids, with their numbering; or the hash path's int64 keys with number = identity.
struct KeySource {
  const void* ids;
  bool int32;
  int64_t stride;
  uint64_t lo;
  const int32_t* number;
  template <typename Id>
  Keys<Id> get() const {
    return Keys<Id>{static_cast<const Id*>(ids), stride, lo, number};
  }
};

// The min and max of rows [r0, r1) of ids (to *lo and *hi); for contiguous ids a loop the compiler
// vectorizes (in the ISA variants: AVX2 compares int64, the baseline ISA cannot). With low set
// (int64 ids), also their low 32 bits to low [M].
template <typename I>
struct MinMaxJob {
  const I* ids;
  int64_t stride;
  int64_t *lo, *hi;
  int32_t* low;
};

template <typename I>
FUSEDRL_HD void minmax_body(const MinMaxJob<I>& j, int64_t r0, int64_t r1) {
  const I* ids = j.ids;
  const int64_t stride = j.stride;
  int64_t lo = int64_t(ids[r0 * stride]), hi = lo;
  int32_t* low = j.low;
  if (stride == 1) {
    I l = ids[r0], h = l;
    for (int64_t r = r0; r < r1; ++r) {  // (gcc unswitches on low: both loops vectorized)
      l = ids[r] < l ? ids[r] : l;
      h = ids[r] > h ? ids[r] : h;
      if (low) low[r] = int32_t(uint32_t(ids[r]));
    }
    lo = int64_t(l);
    hi = int64_t(h);
  } else {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t v = int64_t(ids[r * stride]);
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      if (low) low[r] = int32_t(uint32_t(v));
    }
  }
  *j.lo = lo;
  *j.hi = hi;
}

using MinMax32Fn = void (*)(const MinMaxJob<int32_t>&, int64_t, int64_t);
using MinMax64Fn = void (*)(const MinMaxJob<int64_t>&, int64_t, int64_t);
FUSEDRL_ISA_VARIANTS(minmax_i32, MinMaxJob<int32_t>, minmax_body, int32_t)
FUSEDRL_ISA_VARIANTS(minmax_i64, MinMaxJob<int64_t>, minmax_body, int64_t)

MinMax32Fn minmax_fn(const int32_t*) {
  static const MinMax32Fn fn = minmax_i32();
  return fn;
}
MinMax64Fn minmax_fn(const int64_t*) {
  static const MinMax64Fn fn = minmax_i64();
  return fn;
}

// marks[id - base] = 1 for the ids of rows [r0, r1). A function of its own with restrict
// pointers: in a lambda capturing by reference, the byte store may alias the captures, which the
// profile showed reloaded from the stack on every row.
template <typename I>
void mark_ids(const I* __restrict ids, int64_t stride, uint64_t base, uint8_t* __restrict marks, int64_t r0,
              int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) marks[id_offset(ids[r * stride], base)] = 1;
}

// The dense keys of raw ids and their number G. When the ids span less than 4 M + 1024 values,
// the ids present are marked with plain byte stores (nt threads, each over its slice of rows into
// its own byte map: no read-modify-write chain, unlike a bitmap's OR) and numbered in increasing
// order, 8 at a time (the exclusive prefix count of 8 bytes of 0/1 is one multiplication); pass 1
// then looks each row's key up in number [range] (int32) as it reads the row, instead of a
// separate pass storing them. int64 ids: the min/max pass also stores their low 32 bits in
// sc.kept [M] (which pass 1 then overwrites with the keys), and the marking and pass 1 read those
// (offsets modulo 2^32, exact as range < 2^32): the 8-byte ids are read once, not three times
// (at 65,536 rows their 512 KB do not stay in a 512 KB L2 between passes). Else a hash table
// (open addressing, one thread) numbers them by first appearance into sc.slot [M] and number is
// the identity.
template <typename I>
KeySource make_keys(const I* ids, int64_t stride, int64_t M, Scratch& sc, int nt, int64_t& G) {
  G = 0;
  KeySource out{ids, std::is_same<I, int32_t>::value, stride, 0, nullptr};
  if (M == 0) return out;
  const int64_t parts = std::min<int64_t>(nt, 8);
  int64_t los[8], his[8];
  auto in_parts = [&](const auto& body) {
    if (parts <= 1) {
      body(int64_t(0));
      return;
    }
#pragma omp parallel num_threads(static_cast<int>(parts))
    body(int64_t(omp_get_thread_num()));
  };
  const auto minmax = minmax_fn(ids);
  sc.kept.resize(size_t(M));
  int32_t* low = std::is_same<I, int64_t>::value ? sc.kept.data() : nullptr;
  in_parts([&](int64_t t) {
    minmax(MinMaxJob<I>{ids, stride, los + t, his + t, low}, M * t / parts, M * (t + 1) / parts);
  });
  const int64_t lo = *std::min_element(los, los + parts), hi = *std::max_element(his, his + parts);
  const uint64_t range = uint64_t(hi) - uint64_t(lo);  // no overflow for any int64 pair
  if (range < uint64_t(4 * M + 1024) && range < (uint64_t(1) << 32)) {
    if (low) out = KeySource{low, true, 1, 0, nullptr};
    const int64_t span = int64_t(range) + 1, padded = (span + 7) & ~int64_t(7);
    std::vector<uint8_t>& seen = sc.seen;
    seen.resize(size_t(parts * padded));
    in_parts([&](int64_t t) {
      uint8_t* own = seen.data() + t * padded;
      std::memset(own, 0, size_t(padded));
      if (low) {
        mark_ids(low, 1, uint64_t(lo), own, M * t / parts, M * (t + 1) / parts);
      } else {
        mark_ids(ids, stride, uint64_t(lo), own, M * t / parts, M * (t + 1) / parts);
      }
    });
    std::vector<int32_t>& number = sc.number;
    number.resize(size_t(padded));
    int32_t* num = number.data();
    uint64_t n = 0;
    for (int64_t i = 0; i < padded; i += 8) {
      uint64_t any = 0;
      for (int64_t t = 0; t < parts; ++t) {
        uint64_t w;
        std::memcpy(&w, seen.data() + t * padded + i, 8);
        any |= w;
      }
      // bytes of 0/1: byte j of any * 0x0101.. is the count of bytes 0..j (little-endian byte
      // order), at most 8, so no carries; minus any: the count before byte j
      const uint64_t incl = any * 0x0101010101010101ull, excl = incl - any;
      for (int j = 0; j < 8; ++j) num[i + j] = int32_t(n + ((excl >> (8 * j)) & 0xff));
      n += incl >> 56;
    }
    G = int64_t(n);
    out.lo = uint64_t(lo);
    out.number = num;
    return out;
  }
  int bits = 4;  // open addressing, linear probing, at most half full
  while ((int64_t(1) << bits) < 2 * M) ++bits;
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  std::vector<int64_t>&keys = sc.keys, &vals = sc.vals, &slot = sc.slot;
  keys.resize(mask + 1);
  vals.assign(mask + 1, -1);
  slot.resize(M);
  for (int64_t r = 0; r < M; ++r) {
    const int64_t v = int64_t(ids[r * stride]);
    uint64_t h = (uint64_t(v) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
    while (vals[h] >= 0 && keys[h] != v) h = (h + 1) & mask;
    if (vals[h] < 0) {
      keys[h] = v;
      vals[h] = G++;
    }
    slot[r] = vals[h];
  }
  std::vector<int32_t>& number = sc.number;
  number.resize(size_t(G));
  for (int64_t g = 0; g < G; ++g) number[g] = int32_t(g);
  return KeySource{slot.data(), false, 1, 0, number.data()};
}

}  // namespace
}  // namespace cpu
}  // namespace fusedrl
