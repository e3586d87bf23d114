//! One module per subcommand.

pub mod cache;
pub mod convert;
pub mod extract;
pub mod inspect;
pub mod keygen;
pub mod mount;
pub mod profile;
pub mod run;
pub mod serve;
