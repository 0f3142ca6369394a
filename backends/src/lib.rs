//! PV backends (blkback, netback) and their storage and network engines.
//! (Filled in by the blkback and netback issues.)
#![deny(unsafe_code)]
