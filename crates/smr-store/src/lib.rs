//! smr-store
