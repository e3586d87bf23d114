//! AES-256-CTR as chunks use it: a 128-bit big-endian block counter
//! starting from a zero IV, exactly `ctr::Ctr128BE<aes::Aes256>` with a
//! zero nonce (FORMAT.md). Block `i` of the keystream is
//! `AES-256(key, i as a big-endian u128)`.
//!
//! Every warm read a node serves is decrypted here, so its speed is the
//! speed of a warm read: on CPUs with VAES and AVX-512 (x86-64 since Ice
//! Lake and Zen 4) 16 blocks are encrypted per step, four per 512-bit
//! register. On other CPUs the RustCrypto implementation does the work.
//! Both give the same bytes, which the tests check on random keys and
//! lengths.
//!
//! The VAES path decrypts 64 KiB chunks about 2.6x as fast as `aes` 0.8 +
//! `ctr` 0.9 (AES-NI) and 2.9x as fast as `aes` 0.9.4 + `ctr` 0.10.1,
//! whose VAES backend is used but whose CTR layer makes the counter blocks
//! one at a time (`cargo run --release -p smr-format --example ctr_speed`).

use aes::cipher::{KeyIvInit, StreamCipher};

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

/// XORs `data` with the keystream of `key` (encrypts and decrypts).
pub(crate) fn apply_keystream(key: &[u8; 32], data: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if vaes::apply_keystream(key, data) {
        return;
    }
    portable(key, data);
}

/// The RustCrypto implementation (AES-NI when present, else constant-time
/// software AES).
fn portable(key: &[u8; 32], data: &mut [u8]) {
    let mut cipher = Aes256Ctr::new(key.into(), &[0u8; 16].into());
    cipher.apply_keystream(data);
}

#[cfg(target_arch = "x86_64")]
mod vaes {
    use std::arch::x86_64::*;

    /// Bytes per step: 16 blocks of 16 bytes, in four 512-bit registers
    /// of four blocks each.
    const STEP: usize = 16 * 16;

    /// Whether this CPU runs [`apply_keystream`]'s VAES path (detected
    /// once; `is_x86_feature_detected!` caches it).
    pub(super) fn available() -> bool {
        is_x86_feature_detected!("aes")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("vaes")
    }

    /// [`super::apply_keystream`] with VAES, if this CPU has it; returns
    /// whether it did (else `data` is untouched).
    pub(super) fn apply_keystream(key: &[u8; 32], data: &mut [u8]) -> bool {
        if !available() {
            return false;
        }
        // SAFETY: `available()` just confirmed that the CPU supports every
        // feature `apply_vaes` is compiled for (aes, avx512f, avx512bw,
        // vaes), which is the only requirement of calling a
        // `#[target_feature]` function.
        #[allow(unsafe_code)]
        unsafe {
            apply_vaes(key, data)
        };
        true
    }

    /// AES-256 round keys from `key` (the FIPS-197 key expansion, with
    /// `AESKEYGENASSIST` doing SubWord/RotWord and the round constant).
    #[allow(unsafe_code)]
    #[target_feature(enable = "aes")]
    fn expand_key(key: &[u8; 32]) -> [__m128i; 15] {
        /// One step of the schedule: `k` with its words chained (`w[i] ^=
        /// w[i-1] ^ ... ^ w[0]`) and XORed with `t` (the assist's output,
        /// its relevant word broadcast).
        #[target_feature(enable = "aes")]
        fn chain(k: __m128i, t: __m128i) -> __m128i {
            let mut k = k;
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
            _mm_xor_si128(k, t)
        }
        /// The even round key after `a` (previous even) and `b` (previous
        /// odd), with round constant `RCON`.
        #[target_feature(enable = "aes")]
        fn even<const RCON: i32>(a: __m128i, b: __m128i) -> __m128i {
            chain(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<RCON>(b)),
            )
        }
        /// The odd round key after `b` (previous odd) and `a` (the even
        /// one just made): SubWord without rotation or constant.
        #[target_feature(enable = "aes")]
        fn odd(b: __m128i, a: __m128i) -> __m128i {
            chain(
                b,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            )
        }
        // SAFETY: both loads read 16 bytes inside the 32-byte `key`
        // (unaligned loads, so any address is fine).
        let (k0, k1) = unsafe {
            (
                _mm_loadu_si128(key.as_ptr().cast()),
                _mm_loadu_si128(key.as_ptr().add(16).cast()),
            )
        };
        let mut rk = [k0; 15];
        rk[1] = k1;
        rk[2] = even::<0x01>(rk[0], rk[1]);
        rk[3] = odd(rk[1], rk[2]);
        rk[4] = even::<0x02>(rk[2], rk[3]);
        rk[5] = odd(rk[3], rk[4]);
        rk[6] = even::<0x04>(rk[4], rk[5]);
        rk[7] = odd(rk[5], rk[6]);
        rk[8] = even::<0x08>(rk[6], rk[7]);
        rk[9] = odd(rk[7], rk[8]);
        rk[10] = even::<0x10>(rk[8], rk[9]);
        rk[11] = odd(rk[9], rk[10]);
        rk[12] = even::<0x20>(rk[10], rk[11]);
        rk[13] = odd(rk[11], rk[12]);
        rk[14] = even::<0x40>(rk[12], rk[13]);
        rk
    }

    /// The keystream blocks of the four counter registers `ctr` (each
    /// four little-endian 128-bit counters; `rev` turns them big-endian).
    #[target_feature(enable = "aes,avx512f,avx512bw,vaes")]
    fn keystream(rk: &[__m512i; 15], ctr: &[__m512i; 4], rev: __m512i) -> [__m512i; 4] {
        let mut b = ctr.map(|c| _mm512_xor_si512(_mm512_shuffle_epi8(c, rev), rk[0]));
        for k in &rk[1..14] {
            for reg in b.iter_mut() {
                *reg = _mm512_aesenc_epi128(*reg, *k);
            }
        }
        b.map(|reg| _mm512_aesenclast_epi128(reg, rk[14]))
    }

    #[allow(unsafe_code)]
    #[target_feature(enable = "aes,avx512f,avx512bw,vaes")]
    fn apply_vaes(key: &[u8; 32], data: &mut [u8]) {
        let rk = expand_key(key).map(|k| _mm512_broadcast_i32x4(k));
        // Reverses the bytes of each 128-bit lane: a little-endian counter
        // becomes the big-endian counter block.
        let rev = _mm512_broadcast_i32x4(_mm_set_epi8(
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ));
        // Register j holds blocks 4j .. 4j + 3, each as (low u64, high
        // u64) = (block, 0). A chunk has far fewer than 2^64 blocks, so
        // the low half never carries into the high one.
        let mut ctr =
            [0i64, 4, 8, 12].map(|j| _mm512_set_epi64(0, j + 3, 0, j + 2, 0, j + 1, 0, j));
        let step = _mm512_set_epi64(0, 16, 0, 16, 0, 16, 0, 16);
        let mut pieces = data.chunks_exact_mut(STEP);
        for piece in &mut pieces {
            let ks = keystream(&rk, &ctr, rev);
            for (j, k) in ks.iter().enumerate() {
                // SAFETY: bytes 64*j .. 64*j + 64 lie inside the 256-byte
                // `piece` (j < 4), which we borrow mutably; the load and
                // store are unaligned.
                unsafe {
                    let p = piece.as_mut_ptr().add(64 * j);
                    let d = _mm512_loadu_si512(p.cast());
                    _mm512_storeu_si512(p.cast(), _mm512_xor_si512(d, *k));
                }
            }
            for c in ctr.iter_mut() {
                *c = _mm512_add_epi64(*c, step);
            }
        }
        let tail = pieces.into_remainder();
        if !tail.is_empty() {
            let mut ks = [0u8; STEP];
            for (j, k) in keystream(&rk, &ctr, rev).iter().enumerate() {
                // SAFETY: bytes 64*j .. 64*j + 64 lie inside the 256-byte
                // `ks` (j < 4); the store is unaligned.
                unsafe { _mm512_storeu_si512(ks.as_mut_ptr().add(64 * j).cast(), *k) };
            }
            for (d, k) in tail.iter_mut().zip(ks.iter()) {
                *d ^= k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(seed: u64, len: usize) -> Vec<u8> {
        smr_testkit::noise(len, seed)
    }

    /// A known answer: with the all-zero key, keystream block 0 is
    /// AES-256 of the zero block, `dc95c078a2408989ad48a21492842087`.
    #[test]
    fn known_answer() {
        let mut block = [0u8; 16];
        apply_keystream(&[0u8; 32], &mut block);
        assert_eq!(hex::encode(block), "dc95c078a2408989ad48a21492842087");
    }

    /// Lengths around the 256-byte step and chunk sizes, both paths.
    #[test]
    fn matches_the_reference_on_chunk_sized_inputs() {
        for (seed, len) in [
            (1, 0),
            (2, 1),
            (3, 15),
            (4, 16),
            (5, 255),
            (6, 256),
            (7, 257),
        ] {
            let key: [u8; 32] = bytes(seed * 31, 32).try_into().expect("32 bytes");
            let plain = bytes(seed, len);
            let (mut a, mut b) = (plain.clone(), plain.clone());
            apply_keystream(&key, &mut a);
            portable(&key, &mut b);
            assert_eq!(a, b, "length {len}");
        }
        for len in [64 << 10, (64 << 10) + 3, 1 << 20] {
            let key = [0x5a; 32];
            let plain = bytes(len as u64, len);
            let (mut a, mut b) = (plain.clone(), plain.clone());
            apply_keystream(&key, &mut a);
            portable(&key, &mut b);
            assert!(a == b, "length {len}");
            apply_keystream(&key, &mut a);
            assert!(a == plain, "applying twice gives the plaintext back");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vaes_path_is_the_one_tested_here_when_the_cpu_has_it() {
        // Not an assertion about the machine: a record, in the test log,
        // of which path `matches_the_reference_*` exercised.
        eprintln!("VAES path available: {}", vaes::available());
        let key = [7u8; 32];
        let mut a = vec![0u8; 4096];
        let mut b = a.clone();
        if !vaes::apply_keystream(&key, &mut a) {
            portable(&key, &mut a);
        }
        portable(&key, &mut b);
        assert_eq!(a, b);
    }

    proptest! {
        #[test]
        fn equals_the_reference(key in any::<[u8; 32]>(), seed in any::<u64>(), len in 0usize..5000) {
            let plain = bytes(seed, len);
            let (mut a, mut b) = (plain.clone(), plain);
            apply_keystream(&key, &mut a);
            portable(&key, &mut b);
            prop_assert_eq!(a, b);
        }
    }
}
