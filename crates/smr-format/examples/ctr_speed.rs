//! Decryption speed of a chunk: smr's AES-256-CTR (`decode_verified`,
//! VAES when the CPU has it) next to the RustCrypto `ctr` + `aes` crates,
//! side by side on the same 64 KiB buffer, several rounds.
//!
//! `cargo run --release -p smr-format --example ctr_speed [ROUNDS]`

use aes::cipher::{KeyIvInit, StreamCipher};
use smr_format::{ChunkId, ChunkKey};
use std::time::Instant;

const LEN: usize = 64 << 10;
const ITERS: usize = 20_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = match std::env::args().nth(1) {
        Some(r) => r.parse()?,
        None => 5,
    };
    let key = [0x42u8; 32];
    let id = ChunkId([0; 32]);
    let gb = (LEN * ITERS) as f64 / 1e9;
    println!("| round | smr (GB/s) | ctr + aes crates (GB/s) | ratio |");
    println!("| --- | --- | --- | --- |");
    let mut buf = vec![7u8; LEN];
    for r in 1..=rounds {
        let t = Instant::now();
        for _ in 0..ITERS {
            let data = std::mem::take(&mut buf);
            buf = smr_format::chunk::decode_verified(&id, Some(&ChunkKey(key)), false, data, LEN)?;
        }
        let ours = gb / t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..ITERS {
            let mut c = ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &[0u8; 16].into());
            c.apply_keystream(&mut buf);
        }
        let crates = gb / t.elapsed().as_secs_f64();
        println!("| {r} | {ours:.2} | {crates:.2} | {:.2}x |", ours / crates);
    }
    Ok(())
}
