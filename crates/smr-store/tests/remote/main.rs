//! Remote chunk stores against real servers on 127.0.0.1: `python3 -m
//! http.server` and scripted HTTP responders for the HTTP store, `s3s-fs`
//! (through `scripts/s3.sh`) for the S3 store. One binary, topic modules.

#![allow(clippy::unwrap_used)]

mod contract;
mod http;
mod s3;
mod support;
