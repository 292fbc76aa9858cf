//! Operations: the startup checks and the admin API (scheduler, monitors and metrics to
//! come).

pub mod admin;
pub mod api;
pub mod checks;
