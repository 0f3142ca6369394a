//! The tap engine (being built; see the netback issue).
