//! Decryption speed of a chunk: smr's AES-256-CTR (`decode_verified`,
//! VAES when the CPU has it) next to the RustCrypto `ctr` + `aes` crates
//! smr falls back to (aes 0.8, ctr 0.9) and their newest releases (aes
//! 0.9, whose VAES backend is picked at run time, with ctr 0.10), side by
//! side on the same 64 KiB buffer, several rounds. All three give the
//! same bytes (checked before timing).
//!
//! `cargo run --release -p smr-format --example ctr_speed [ROUNDS]`

use smr_format::{ChunkId, ChunkKey};
use std::time::Instant;

const LEN: usize = 64 << 10;
const ITERS: usize = 20_000;

/// The fallback of `smr_format`: `ctr` 0.9 with `aes` 0.8.
fn crates_08(key: &[u8; 32], data: &mut [u8]) {
    use aes::cipher::{KeyIvInit, StreamCipher};
    let mut c = ctr::Ctr128BE::<aes::Aes256>::new(key.into(), &[0u8; 16].into());
    c.apply_keystream(data);
}

/// `ctr` 0.10 with `aes` 0.9 (encryption-only key schedule).
fn crates_09(key: &[u8; 32], data: &mut [u8]) {
    use aes09::cipher::{KeyIvInit, StreamCipher};
    let mut c = ctr010::Ctr128BE::<aes09::Aes256Enc>::new(key.into(), &[0u8; 16].into());
    c.apply_keystream(data);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(r) => r.parse()?,
        None => 5,
    };
    let key = [0x42u8; 32];
    let id = ChunkId([0; 32]);
    let decode = |data: Vec<u8>| {
        let len = data.len();
        smr_format::chunk::decode_verified(&id, Some(&ChunkKey(key)), false, data, len)
    };
    for len in [0, 1, 255, 256, 257, 1025, LEN + 3] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let (mut a, mut b) = (plain.clone(), plain.clone());
        crates_08(&key, &mut a);
        crates_09(&key, &mut b);
        if decode(plain)? != a || a != b {
            return Err(format!("the three disagree on {len} bytes").into());
        }
    }
    let gb = (LEN * ITERS) as f64 / 1e9;
    println!(
        "| round | smr (GB/s) | aes 0.8 + ctr 0.9 (GB/s) | aes 0.9 + ctr 0.10 (GB/s) \
         | smr / 0.8 | smr / 0.9 |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut buf = vec![7u8; LEN];
    for r in 1..=rounds {
        let t = Instant::now();
        for _ in 0..ITERS {
            buf = decode(std::mem::take(&mut buf))?;
        }
        let ours = gb / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..ITERS {
            crates_08(&key, &mut buf);
        }
        let old = gb / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..ITERS {
            crates_09(&key, &mut buf);
        }
        let new = gb / t.elapsed().as_secs_f64();
        println!(
            "| {r} | {ours:.2} | {old:.2} | {new:.2} | {:.2}x | {:.2}x |",
            ours / old,
            ours / new
        );
    }
    Ok(())
}
