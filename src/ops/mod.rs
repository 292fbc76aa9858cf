//! Operations: the startup checks (more — scheduler, monitors, metrics, admin API — to come).

pub mod checks;
