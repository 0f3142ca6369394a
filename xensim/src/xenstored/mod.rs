//! xensim's xenstored (to be filled in).
