//! Generic shared ring (io/ring.h) over SharedMem (to be filled in).
