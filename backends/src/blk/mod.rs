//! blkback: the PV block backend (io/blkif.h), and its storage engines.

pub mod engine;
