//! `agentbus check`: the config, the data directory's permissions, then the homeserver
//! checks, without serving.

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::matrix::MatrixClient;
use crate::net::Contact;
use crate::ops::checks::{self, CheckFailure, EXIT_LOCAL_SETUP};
use crate::server::Services;

/// `agentbus check`: the config, then the homeserver checks. When no agentbus is running,
/// a temporary one listens for the homeserver's ping (journaling, not answering, anything
/// the homeserver delivers meanwhile, so nothing is lost).
pub async fn check(config: Config) -> Result<(), CheckFailure> {
    println!(
        "✓ config valid ({} agents, {} providers)",
        config.agents.len(),
        config.providers.len()
    );
    let shutdown = CancellationToken::new();
    let (matrix, contact, server): (_, std::sync::Arc<Contact>, _) =
        match tokio::net::TcpListener::bind(config.appservice.bind).await {
            Ok(listener) => {
                let services = Services::build(config.clone())?;
                let matrix = services.matrix.clone();
                let contact = services.contact();
                let app = services.app();
                let stop = shutdown.clone();
                let server = tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop.cancelled_owned())
                        .await
                });
                (matrix, contact, Some(server))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                println!(
                    "· {} is in use — assuming agentbus serve is running there",
                    config.appservice.bind
                );
                let as_token = config.appservice.as_token.as_deref().unwrap_or_default();
                (
                    MatrixClient::new(config.homeserver.url.as_str(), as_token, Default::default()),
                    Default::default(),
                    None,
                )
            }
            Err(e) => {
                return Err(CheckFailure::new(
                    EXIT_LOCAL_SETUP,
                    format!("✗ cannot listen on {}: {e}", config.appservice.bind),
                ));
            }
        };
    // After the store opened (it creates a missing data directory), before the homeserver.
    println!("{}", checks::data_dir_check(&config.store.path));
    let result = checks::run_homeserver_checks(&config, &matrix, &contact).await;
    shutdown.cancel();
    if let Some(server) = server {
        let _ = server.await;
    }
    for line in result? {
        println!("{line}");
    }
    for line in crate::bridges::preflight(&config).await {
        println!("{line}");
    }
    Ok(())
}
