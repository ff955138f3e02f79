//! bitnet.cpp's I2_S ternary tensor type (`ggml_type` 36 in bitnet.cpp's ggml fork; mainline
//! ggml uses 36 for something else).
//!
//! # Layout (x86 converters)
//! A tensor of `n` values (`n` a multiple of 128) takes `n/4 + 32` bytes:
//! - `n/4` bytes of 2-bit codes: code 0 = -1, 1 = 0, 2 = +1 (3 never occurs in valid files);
//! - one little-endian f32 `scale` (the weight is `code * scale`);
//! - 28 padding bytes that are NOT always zero (llama-quantize leaves stale buffer bytes there):
//!   ignored.
//!
//! The values are the tensor in row-major `[out][in]` order (ggml's flat order, `ne[0] = in`
//! fastest), cut into blocks of 128 values stored in 32 bytes each. Byte `p` (0..32) of block `b`
//! holds value `128*b + p` in bits 7:6, `128*b + p + 32` in bits 5:4, `128*b + p + 64` in bits
//! 3:2 and `128*b + p + 96` in bits 1:0.
//!
//! ARM builds of bitnet.cpp write 64-value blocks in 16 bytes instead; nothing in the file says
//! which layout was used, so this reader implements the x86 layout, which is what the published
//! `microsoft/bitnet-b1.58-2B-4T-gguf` file and the test fixture use.
//!
//! # Provenance
//! - bitnet.cpp `quantize_i2_s` (src/ggml-bitnet-mad.cpp, `QK_I2_S = 128` on x86): the packing
//!   loop `group_idx = j / 32, group_pos = j % 32` shifts group `g` to bits `6 - 2g`, and the scale
//!   is written at byte `n/4`; `ggml_nbytes` gives `n/4 + 32` for I2_S.
//! - Verified on `shared/fixtures/gguf-tiny/ggml-model-i2_s.gguf` (written by bitnet.cpp's own
//!   pipeline on x86): decoding all 14 I2_S tensors with this layout gives exactly the codes of
//!   transformers' online ternarization of the bf16 masters in `model.safetensors`
//!   (`round_half_even(W * inv).clamp(-1, 1)`, `inv = 1 / max(mean|W|, 1e-5)` in f32), with no
//!   row permutation, no code 3, and a stored scale equal to `1 / inv` bit for bit
//!   (`crates/bitnet-core/tests/gguf.rs`, `fixture_i2s_codes_and_scales_match_masters`).
//!   "Bit for bit" needs mean|W| summed in f32 in torch's CPU order (the test emulates
//!   `cascade_sum` with 8-lane AVX2 vectors and 2 threads, as the fixture was made); a correctly
//!   rounded mean gives a scale two ulps off on 4 of the 14 tensors.

/// Values per I2_S block (x86 layout).
pub const BLOCK_VALUES: usize = 128;
/// Bytes per I2_S block.
pub const BLOCK_BYTES: usize = 32;
/// Bytes after the codes: the f32 scale and 28 padding bytes.
pub const TRAILER_BYTES: usize = 32;

/// Bytes of an I2_S tensor of `n` values (`n/4 + 32`).
pub fn i2s_nbytes(n: usize) -> usize {
    n / 4 + TRAILER_BYTES
}

/// Decodes `n` values (a multiple of 128) from I2_S `bytes` (at least `n/4 + 4` bytes: codes
/// then the f32 scale; padding after the scale is ignored). Returns the row-major codes in
/// {-1, 0, +1} and the scale. Errors (as a message, the caller names the tensor): wrong `n`,
/// too few bytes, a code 3 (with the index of the first one), a non-finite or negative scale.
pub fn decode(bytes: &[u8], n: usize) -> Result<(Vec<i8>, f32), String> {
    if n % BLOCK_VALUES != 0 {
        return Err(format!("I2_S element count {n} is not a multiple of {BLOCK_VALUES}"));
    }
    let code_bytes = n / 4;
    if bytes.len() < code_bytes + 4 {
        return Err(format!(
            "I2_S data is {} bytes; {n} values need {} bytes of codes plus a 4-byte scale",
            bytes.len(),
            code_bytes
        ));
    }
    let (codes, rest) = bytes.split_at(code_bytes);
    let scale = f32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(format!("I2_S scale {scale} is not a finite non-negative number"));
    }

    // A pair of bits is 0b11 exactly where `b & (b >> 1)` has a 1 in an even position. Valid
    // codes are `value + 1`, so a subtraction decodes them (a code 3 fails the whole tensor):
    // arithmetic vectorizes where a table lookup per value did not (1 ns a value, 2 s of CPU
    // for 2B-4T's 2.1 G).
    let mut bad = 0u8;
    let mut out = vec![0i8; n];
    for (blk, o) in codes.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK_VALUES)) {
        for (g, og) in o.chunks_exact_mut(BLOCK_BYTES).enumerate() {
            for (v, &b) in og.iter_mut().zip(blk) {
                *v = ((b >> (6 - 2 * g)) & 3) as i8 - 1;
            }
        }
        bad = blk.iter().fold(bad, |bad, &b| bad | (b & (b >> 1) & 0x55));
    }
    if bad != 0 {
        let at = first_code3(codes).unwrap_or(0);
        return Err(format!("invalid I2_S code 3 at element {at} (valid codes are 0, 1, 2)"));
    }
    Ok((out, scale))
}

/// Index (in value order) of the first code 3, if any.
fn first_code3(codes: &[u8]) -> Option<usize> {
    let mut first: Option<usize> = None;
    for (bi, blk) in codes.chunks_exact(BLOCK_BYTES).enumerate() {
        for (p, &b) in blk.iter().enumerate() {
            for g in 0..4 {
                if (b >> (6 - 2 * g)) & 3 == 3 {
                    let idx = bi * BLOCK_VALUES + g * 32 + p;
                    first = Some(first.map_or(idx, |f| f.min(idx)));
                }
            }
        }
        if first.is_some() {
            return first;
        }
    }
    first
}

/// Encodes row-major ternary `codes` (each in {-1, 0, +1}, length a multiple of 128) and a scale
/// into I2_S bytes (`n/4 + 32`, zero padding). The inverse of [`decode`]; used by the GGUF
/// writer and tests.
pub fn encode(codes: &[i8], scale: f32) -> Result<Vec<u8>, String> {
    if codes.len() % BLOCK_VALUES != 0 {
        return Err(format!("I2_S element count {} is not a multiple of {BLOCK_VALUES}", codes.len()));
    }
    let mut out = vec![0u8; i2s_nbytes(codes.len())];
    for (bi, blk) in codes.chunks_exact(BLOCK_VALUES).enumerate() {
        for (j, &c) in blk.iter().enumerate() {
            let code = match c {
                -1 => 0u8,
                0 => 1,
                1 => 2,
                other => return Err(format!("value {other} at element {} is not ternary", bi * BLOCK_VALUES + j)),
            };
            let (g, p) = (j / 32, j % 32);
            out[bi * BLOCK_BYTES + p] |= code << (6 - 2 * g);
        }
    }
    let at = codes.len() / 4;
    out[at..at + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_one_block() {
        // element p -> bits 7:6 of byte p, p+32 -> 5:4, p+64 -> 3:2, p+96 -> 1:0
        let mut codes = vec![0i8; 128];
        codes[0] = 1; // byte 0 bits 7:6 = 2
        codes[33] = -1; // byte 1 bits 5:4 = 0
        codes[127] = 1; // byte 31 bits 1:0 = 2
        let b = encode(&codes, 1.5).unwrap();
        assert_eq!(b.len(), 64);
        assert_eq!(b[0], 0b10_01_01_01);
        assert_eq!(b[1], 0b01_00_01_01);
        assert_eq!(b[31], 0b01_01_01_10);
        assert_eq!(f32::from_le_bytes([b[32], b[33], b[34], b[35]]), 1.5);
        let (d, s) = decode(&b, 128).unwrap();
        assert_eq!(d, codes);
        assert_eq!(s, 1.5);
    }

    #[test]
    fn roundtrip_and_ignores_padding() {
        let mut x = 0x1234_5678u32;
        let codes: Vec<i8> = (0..512)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 3) as i8 - 1
            })
            .collect();
        let mut b = encode(&codes, 0.25).unwrap();
        let n4 = codes.len() / 4;
        for v in &mut b[n4 + 4..] {
            *v = 0xAB; // stale padding, as llama-quantize leaves it
        }
        assert_eq!(decode(&b, 512).unwrap(), (codes, 0.25));
    }

    #[test]
    fn rejects_code3_and_bad_sizes() {
        let mut b = encode(&[0i8; 256], 1.0).unwrap();
        b[32 + 5] |= 0b0000_1100; // block 1, byte 5, group 2 -> element 128 + 64 + 5
        let e = decode(&b, 256).unwrap_err();
        assert!(e.contains("code 3 at element 197"), "{e}");
        assert!(decode(&b, 100).unwrap_err().contains("multiple of 128"));
        assert!(decode(&b[..60], 256).unwrap_err().contains("bytes"));
        let mut b = encode(&[0i8; 128], 1.0).unwrap();
        b[32..36].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode(&b, 128).unwrap_err().contains("scale"));
        assert!(encode(&[2i8; 128], 1.0).is_err());
    }
}
