//! The NBD protocol: wire constants, the sans-I/O codec, and the drivers for
//! the two phases (handshake = option haggling, transmission = requests).

pub mod codec;
pub mod consts;
pub mod handshake;
pub mod transmission;
