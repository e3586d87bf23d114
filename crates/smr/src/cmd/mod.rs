//! One module per subcommand, and `image`: the options they share for
//! reading an image.

pub mod cache;
pub mod commit;
pub mod convert;
pub mod daemon;
pub mod extract;
pub mod gc;
pub mod image;
pub mod inspect;
pub mod keygen;
pub mod mount;
pub mod optimize;
pub mod profile;
pub mod publish;
pub mod reproduce;
pub mod run;
pub mod serve;
pub mod store;
pub mod volume;
