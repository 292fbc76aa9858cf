//! Operations: the startup checks, the admin API, health/ready probes, metrics and the
//! management commands (scheduler and monitors to come).

pub mod api;
pub mod checks;
pub mod commands;
pub mod health;
pub mod metrics;
