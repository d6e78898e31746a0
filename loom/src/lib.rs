//! See tests/protocol.rs.
