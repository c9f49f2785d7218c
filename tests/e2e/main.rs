//! End-to-end tests: the real `nbdhost` binary, real NBD clients.
//! Build first with `cargo build --workspace` (tests/run.sh does it all).

mod authors;
mod clients;
mod config_errors;
mod filters_ops;
mod filters_shape;
mod layering;
mod lifecycle;
mod plugins;
mod protocol;
mod protocol_clients;
mod tls;
