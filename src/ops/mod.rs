//! Operations: the startup checks, the admin API and metrics (scheduler and monitors to
//! come).

pub mod api;
pub mod checks;
pub mod schedule;
