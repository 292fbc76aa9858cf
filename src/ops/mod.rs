//! Operations: the startup checks, the admin API, health/ready probes, metrics, the
//! management commands, and the scheduler of tasks and heartbeats ([`schedule`]);
//! monitors to come.

pub mod api;
pub mod checks;
pub mod commands;
pub mod health;
pub mod metrics;
pub mod schedule;
