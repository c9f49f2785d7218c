//! Raw-bytes conformance suite for the NBD protocol (being written).
