// Element types the kernels read and write, and exact conversions to and from fp32.
// Codes must match fastmerge/dtypes.py NATIVE_CODES.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace fastmerge {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2, F8_E4M3 = 3, F8_E5M2 = 4 };

inline uint32_t f32_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float bits_f32(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float x) {
  uint32_t u = f32_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// fp16 conversions on the integer bits, branch-free so the kernel loops vectorise (GCC 12 does
// not vectorise _Float16 <-> float, which made fp16 blends 10x slower than bf16), and portable:
// C++ has no _Float16 before GCC 12 on x86 and GCC 13 on aarch64. Round to nearest-even; a NaN
// stays a NaN (fp32 -> fp16 gives the canonical quiet NaN).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  // Exponent rebias by an exact multiply by 2^112: right for normals and subnormals alike.
  float mag = bits_f32(em << 13) * 0x1p112f;
  uint32_t bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : f32_bits(mag);  // inf / NaN
  return bits_f32(bits | sign);
}
inline uint16_t f32_to_f16(float x) {
  const uint32_t u_signed = f32_bits(x);
  const uint32_t sign = (u_signed >> 16) & 0x8000u;
  const uint32_t u = u_signed & 0x7fffffffu;
  // Results below the smallest fp16 normal: adding 0.5 (as fp32, which rounds to nearest-even)
  // lines the fp16 subnormal's bits up at the bottom of the fp32 mantissa.
  const float sub_magic = bits_f32(uint32_t((127 - 15) + (23 - 10) + 1) << 23);
  const uint32_t sub = f32_bits(bits_f32(u) + sub_magic) - f32_bits(sub_magic);
  // Normal results: rebias the exponent and round the 13 dropped bits to nearest-even.
  const uint32_t norm = (u + (uint32_t(15 - 127) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  uint32_t r = u < 0x38800000u ? sub : norm;
  r = u >= 0x47800000u ? (u > 0x7f800000u ? 0x7e00u : 0x7c00u) : r;  // overflow -> inf; NaN
  return uint16_t(r | sign);
}

// fp8 is read-only: decode by formula (e4m3fn: bias 7, no inf, 0x7f/0xff NaN; e5m2: bias 15, IEEE-like).
inline float f8e4m3_to_f32(uint8_t v) {
  int s = v >> 7, e = (v >> 3) & 0xf, m = v & 0x7;
  if (e == 0xf && m == 0x7) return std::nanf("");
  float mag = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
  return s ? -mag : mag;
}
inline float f8e5m2_to_f32(uint8_t v) { return f16_to_f32(uint16_t(v) << 8); }

inline float load(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case F32: return static_cast<const float*>(p)[i];
    case F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case F8_E4M3: return f8e4m3_to_f32(static_cast<const uint8_t*>(p)[i]);
    case F8_E5M2: return f8e5m2_to_f32(static_cast<const uint8_t*>(p)[i]);
  }
  return 0.f;
}

inline void store(void* p, int dtype, int64_t i, float x) {
  switch (dtype) {
    case F32: static_cast<float*>(p)[i] = x; return;
    case F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(x); return;
    case BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(x); return;
  }
}

inline void check_input_dtype(int dtype) {
  if (dtype < F32 || dtype > F8_E5M2) throw std::invalid_argument("unknown input dtype code");
}
inline void check_output_dtype(int dtype) {
  if (dtype < F32 || dtype > BF16) throw std::invalid_argument("output dtype must be fp32, fp16 or bf16");
}

}  // namespace fastmerge
