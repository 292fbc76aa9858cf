//! Startup checks, in order, each with a one-line human message and its own exit code:
//! config valid (2), homeserver reachable (3), as_token valid (4), homeserver can reach us (5).
//! Local setup problems (store, listener, token file) exit with 6. A data directory that
//! other users can read is a warning ([`data_dir_check`]), not a failure.

use std::fmt;
use std::path::Path;

use crate::config::Config;
use crate::matrix::{MatrixClient, MatrixError};
use crate::net::Contact;
use crate::store;

/// A check that failed: what to print and which exit code to leave with.
#[derive(Debug)]
pub struct CheckFailure {
    pub code: i32,
    pub message: String,
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CheckFailure {}

pub const EXIT_CONFIG: i32 = 2;
pub const EXIT_HOMESERVER_UNREACHABLE: i32 = 3;
pub const EXIT_TOKEN_REJECTED: i32 = 4;
pub const EXIT_PING_FAILED: i32 = 5;
pub const EXIT_LOCAL_SETUP: i32 = 6;

impl CheckFailure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// How many exposed entries [`data_dir_check`] names before "and N more".
const EXPOSED_NAMED: usize = 3;

/// The data directory line of `agentbus check`: `✓` when only agentbus's user can reach
/// anything in it, else `⚠` naming what group or other users can reach (with its mode) and
/// the fix. A warning rather than a failure, so a deployment whose store an older version
/// created keeps running (`serve` logs the same warning) until the operator runs the fix.
pub fn data_dir_check(dir: &Path) -> String {
    data_dir_warning(dir).unwrap_or_else(|| {
        if dir.exists() {
            format!(
                "✓ data directory {} is private to agentbus's user",
                dir.display()
            )
        } else {
            format!(
                "· data directory {} does not exist yet; agentbus creates it private (0700)",
                dir.display()
            )
        }
    })
}

/// The `⚠` line of [`data_dir_check`] when `dir` or anything in it is group- or
/// other-accessible (or cannot be checked); `None` when it is private or missing.
pub fn data_dir_warning(dir: &Path) -> Option<String> {
    let exposed = match store::private::exposed_entries(dir) {
        Ok(exposed) => exposed,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            return Some(format!(
                "⚠ cannot check who may read the data directory {}: {e}",
                dir.display()
            ));
        }
    };
    if exposed.is_empty() {
        return None;
    }
    let mut named: Vec<String> = exposed
        .iter()
        .take(EXPOSED_NAMED)
        .map(|e| format!("{} is {:04o}", e.path.display(), e.mode))
        .collect();
    if exposed.len() > EXPOSED_NAMED {
        named.push(format!("{} more", exposed.len() - EXPOSED_NAMED));
    }
    Some(format!(
        "⚠ the data directory {} is readable by other users than agentbus's ({}); it holds every \
         conversation and the tokens — make it private with: chmod -R go= {}",
        dir.display(),
        named.join(", "),
        shell_quoted(dir)
    ))
}

/// `path` as a shell word: as it is when it needs no quoting, else in single quotes.
fn shell_quoted(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+=:@,".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Runs the homeserver checks in order; returns one line per passed check, or the first
/// failure. The appservice HTTP server must already be listening for the ping to pass.
pub async fn run_homeserver_checks(
    config: &Config,
    matrix: &MatrixClient,
    contact: &Contact,
) -> Result<Vec<String>, CheckFailure> {
    let url = config.homeserver.url.as_str().trim_end_matches('/');
    let mut passed = Vec::new();

    let versions = matrix.get_versions().await.map_err(|e| {
        CheckFailure::new(
            EXIT_HOMESERVER_UNREACHABLE,
            format!("✗ homeserver unreachable at {url}: {e} — is it running, and is homeserver.url right?"),
        )
    })?;
    passed.push(format!(
        "✓ homeserver reachable at {url} (spec {})",
        versions.last().map(String::as_str).unwrap_or("?")
    ));

    let me = matrix.whoami().await.map_err(|e| {
        let hint = match &e {
            MatrixError::Permanent { errcode, .. } if errcode == "M_UNKNOWN_TOKEN" || errcode == "M_FORBIDDEN" => {
                " — the homeserver does not know our as_token: add the file from `agentbus registration` to its app_service_config_files and restart it"
            }
            _ => "",
        };
        CheckFailure::new(EXIT_TOKEN_REJECTED, format!("✗ as_token rejected by the homeserver: {e}{hint}"))
    })?;
    let expected = config.sender_user_id();
    if me != expected {
        return Err(CheckFailure::new(
            EXIT_TOKEN_REJECTED,
            format!(
                "✗ as_token belongs to {me}, expected {expected} — the registration's sender_localpart differs from the config; regenerate it"
            ),
        ));
    }
    passed.push(format!("✓ as_token accepted (acting as {me})"));

    let agentbus_url = config.appservice_url();
    let agentbus_url = agentbus_url.as_str().trim_end_matches('/');
    // `send` already retries a 5xx (a homeserver hiccup) with backoff.
    match matrix.ping_appservice(&config.appservice.id).await {
        Ok(duration) => passed.push(format!(
            "✓ homeserver reached agentbus ({} ms round trip)",
            duration.as_millis()
        )),
        Err(_) if contact.saw_wrong_token() => {
            return Err(CheckFailure::new(
                EXIT_PING_FAILED,
                "✗ the homeserver reached agentbus with a different hs_token: regenerate the registration (`agentbus registration`) and restart the homeserver",
            ));
        }
        // Synapse's recover-on-ping can answer 502 (AlreadyCalled) while its queued
        // transactions are already arriving: the homeserver plainly reaches us.
        Err(e) if contact.reached_us() => passed.push(format!(
            "⚠ the homeserver's ping answered {e}, but it is delivering to agentbus at {agentbus_url} with the right hs_token; going on"
        )),
        Err(e) => {
            return Err(CheckFailure::new(
                EXIT_PING_FAILED,
                format!(
                    "✗ the homeserver cannot reach agentbus at {agentbus_url}: {e} — check appservice.url (and the registration's url) is reachable from the homeserver"
                ),
            ));
        }
    }
    Ok(passed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::private::set_mode;

    #[test]
    fn a_private_data_directory_passes_and_a_missing_one_is_explained() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        assert!(data_dir_check(&dir).starts_with("· data directory "));
        store::private::create_dir(&dir).unwrap();
        assert_eq!(
            data_dir_check(&dir),
            format!(
                "✓ data directory {} is private to agentbus's user",
                dir.display()
            )
        );
        assert_eq!(data_dir_warning(&dir), None);
    }

    #[test]
    fn a_shared_data_directory_names_paths_modes_and_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("my data");
        store::private::create_dir(&dir.join("fjall")).unwrap();
        for name in ["a", "b", "c"] {
            let file = dir.join("fjall").join(name);
            std::fs::write(&file, b"").unwrap();
            set_mode(&file, 0o644);
        }
        set_mode(&dir, 0o755);
        let line = data_dir_check(&dir);
        let shown = dir.display();
        assert!(
            line.starts_with(&format!(
                "⚠ the data directory {shown} is readable by other users"
            )),
            "{line}"
        );
        assert!(
            line.contains(&format!(
                "{shown} is 0755, {shown}/fjall/a is 0644, {shown}/fjall/b is 0644, 1 more"
            )),
            "{line}"
        );
        assert!(line.ends_with(&format!("chmod -R go= '{shown}'")), "{line}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(
            shell_quoted(Path::new("/var/lib/agentbus/data")),
            "/var/lib/agentbus/data"
        );
        assert_eq!(
            shell_quoted(Path::new("/srv/it's here")),
            r"'/srv/it'\''s here'"
        );
    }
}
