//! smr-node
