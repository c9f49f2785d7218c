//! Protocol features exercised through real clients (being written).
