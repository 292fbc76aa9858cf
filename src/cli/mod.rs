//! The command-line clients beside `serve`: `say` (a matrix-sdk human), `route` and
//! `pairing` (through the running agentbus's admin API, or on their own when none runs),
//! and `check`. They drive the modules `serve` uses and never rebuild its wiring: what they
//! need of it comes from [`crate::server::Services`].

pub mod admin;
pub mod check;
pub mod say;
