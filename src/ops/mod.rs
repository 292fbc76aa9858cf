//! Operations: the startup checks, the admin API, health/ready probes, metrics, the
//! management commands, the scheduler of tasks and heartbeats ([`schedule`]), and the
//! health monitors that alert a room ([`monitor`]).

pub mod api;
pub mod checks;
pub mod commands;
pub mod health;
pub mod metrics;
pub mod monitor;
pub mod schedule;
