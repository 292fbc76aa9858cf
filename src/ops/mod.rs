//! Operations: the startup checks, the admin API, health/ready probes and metrics
//! (scheduler and monitors to come).

pub mod api;
pub mod checks;
pub mod health;
pub mod metrics;
