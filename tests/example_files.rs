//! The committed example files are generated from (or checked against) the code, so the
//! docs cannot drift from what agentbus accepts.

use agentbus::appservice::registration::Registration;
use agentbus::config::Config;

#[test]
fn the_example_config_is_valid_and_the_example_registration_is_generated_from_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut config =
        Config::parse(&std::fs::read_to_string(root.join("agentbus.example.yaml")).unwrap())
            .unwrap();
    config.validate().unwrap();
    config.appservice.as_token = Some("CHANGE-ME-as-token".into());
    config.appservice.hs_token = Some("CHANGE-ME-hs-token".into());
    let committed = std::fs::read_to_string(root.join("registration.yaml")).unwrap();
    assert_eq!(
        committed,
        Registration::from_config(&config).to_yaml(),
        "regenerate with: AGENTBUS_AS_TOKEN=CHANGE-ME-as-token AGENTBUS_HS_TOKEN=CHANGE-ME-hs-token \
         agentbus -c agentbus.example.yaml registration -o registration.yaml"
    );
}

// ------------------------------------------------------------------ deployment --

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Value {
    serde_yaml::from_str(&read("compose.yaml")).expect("compose.yaml is YAML")
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    let service = &compose["services"][name];
    assert!(service.is_mapping(), "compose.yaml has no service {name:?}");
    service
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

/// A service's `volumes:` entries in short syntax, as (source, target).
fn mounts(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .map(|v| v.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|entry| {
            let entry = str_of(entry, "a volume entry");
            let mut parts = entry.split(':');
            let source = parts.next().unwrap().to_owned();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("volume {entry:?} has no target"))
                .to_owned();
            (source, target)
        })
        .collect()
}

/// Where `service` mounts `source` (a named volume or a ./path).
fn target_of(service: &Value, name: &str, source: &str) -> String {
    mounts(service)
        .into_iter()
        .find(|(s, _)| s == source)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("service {name} does not mount {source}"))
}

fn without_trailing_slash(path: &str) -> &str {
    path.strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path)
}

fn deploy_config() -> Config {
    let config = Config::parse(&read("deploy/agentbus.yaml")).expect("deploy/agentbus.yaml");
    config.validate().expect("deploy/agentbus.yaml is valid");
    config
}

fn conduit_toml() -> toml::Table {
    read("conduit/conduit.toml")
        .parse::<toml::Table>()
        .expect("conduit/conduit.toml is TOML")
}

fn conduit_global<'a>(table: &'a toml::Table, key: &str) -> &'a toml::Value {
    table["global"]
        .get(key)
        .unwrap_or_else(|| panic!("conduit/conduit.toml has no [global] {key}"))
}

/// `ENV NAME=value` of the Dockerfile's last stage.
fn dockerfile_env(name: &str) -> String {
    let dockerfile = read("Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    runtime
        .lines()
        .find_map(|line| line.strip_prefix(&format!("ENV {name}=")))
        .unwrap_or_else(|| panic!("the Dockerfile's runtime stage sets no ENV {name}"))
        .trim()
        .to_owned()
}

#[test]
fn compose_services_and_volumes_reference_each_other() {
    let compose = compose();
    let services = compose["services"]
        .as_mapping()
        .expect("compose.yaml has services");
    let names: BTreeSet<&str> = services
        .keys()
        .map(|k| str_of(k, "a service name"))
        .collect();
    for wanted in ["conduit", "agentbus", "nginx", "element"] {
        assert!(
            names.contains(wanted),
            "compose.yaml lacks service {wanted}"
        );
    }
    let declared: BTreeSet<&str> = compose["volumes"]
        .as_mapping()
        .expect("compose.yaml declares volumes")
        .keys()
        .map(|k| str_of(k, "a volume name"))
        .collect();
    let mut used = BTreeSet::new();
    for (name, service) in services {
        let name = str_of(name, "a service name");
        for (source, target) in mounts(service) {
            assert!(
                target.starts_with('/'),
                "{name}: target {target:?} is not absolute"
            );
            if let Some(path) = source.strip_prefix("./") {
                assert!(
                    root().join(path).exists(),
                    "{name} mounts ./{path}, which is not in the repository"
                );
            } else if !source.starts_with('/') {
                assert!(
                    declared.contains(source.as_str()),
                    "{name} mounts volume {source:?}, not declared under volumes:"
                );
                used.insert(source);
            }
        }
        for dependency in service["depends_on"]
            .as_sequence()
            .map(|v| v.as_slice())
            .unwrap_or_default()
        {
            let dependency = str_of(dependency, "a depends_on entry");
            assert!(
                names.contains(dependency),
                "{name} depends on {dependency:?}, which is no service"
            );
        }
        // Only the proxy faces the network; anything else on the host's loopback at most.
        if name != "nginx" {
            for port in service["ports"]
                .as_sequence()
                .map(|v| v.as_slice())
                .unwrap_or_default()
            {
                let port = str_of(port, "a port entry");
                assert!(
                    port.starts_with("127.0.0.1:"),
                    "{name} publishes {port:?} beyond the loopback"
                );
            }
        }
    }
    let used: BTreeSet<&str> = used.iter().map(String::as_str).collect();
    assert_eq!(
        used, declared,
        "declared volumes no service mounts, or the reverse"
    );
    assert_eq!(
        service(&compose, "element")["profiles"],
        serde_yaml::from_str::<Value>("[element]").unwrap(),
        "Element Web is optional: a profile"
    );
    assert_eq!(
        str_of(&service(&compose, "agentbus")["build"], "agentbus.build"),
        "."
    );
    assert!(root().join("Dockerfile").exists());
}

#[test]
fn compose_agentbus_finds_its_config_and_data_where_the_image_expects_them() {
    let compose = compose();
    let agentbus = service(&compose, "agentbus");
    let config = deploy_config();
    let config_target = target_of(agentbus, "agentbus", "./deploy/agentbus.yaml");
    assert_eq!(
        str_of(
            &agentbus["environment"]["AGENTBUS_CONFIG"],
            "AGENTBUS_CONFIG"
        ),
        config_target
    );
    assert_eq!(dockerfile_env("AGENTBUS_CONFIG"), config_target);
    let data = target_of(agentbus, "agentbus", "agentbus-data");
    assert_eq!(
        config.store.path,
        PathBuf::from(&data),
        "store.path is the data volume"
    );
    assert!(
        read("Dockerfile").contains(&format!("VOLUME [\"{data}\"]")),
        "the image declares {data} a volume"
    );
}

#[test]
fn compose_conduit_and_agentbus_agree_on_names_ports_and_paths() {
    let compose = compose();
    let conduit = service(&compose, "conduit");
    let toml = conduit_toml();
    let config = deploy_config();

    let config_target = target_of(conduit, "conduit", "./conduit/conduit.toml");
    assert_eq!(
        str_of(&conduit["environment"]["CONDUIT_CONFIG"], "CONDUIT_CONFIG"),
        config_target
    );
    assert_eq!(
        without_trailing_slash(conduit_global(&toml, "database_path").as_str().unwrap()),
        without_trailing_slash(&target_of(conduit, "conduit", "conduit-db")),
        "Conduit's database is on the conduit-db volume"
    );
    assert_eq!(
        conduit_global(&toml, "database_backend").as_str(),
        Some("rocksdb")
    );
    assert_eq!(
        conduit_global(&toml, "allow_registration").as_bool(),
        Some(false)
    );
    assert_eq!(conduit_global(&toml, "address").as_str(), Some("0.0.0.0"));
    assert_eq!(
        conduit_global(&toml, "server_name").as_str(),
        Some(config.homeserver.server_name.as_str()),
        "agentbus's homeserver.server_name is Conduit's server_name"
    );
    let conduit_port = conduit_global(&toml, "port").as_integer().unwrap();
    assert_eq!(
        config.homeserver.url.as_str(),
        format!("http://conduit:{conduit_port}/"),
        "agentbus reaches Conduit by its service name and port"
    );

    // What Conduit is given in its admin room: the URL it delivers transactions to is
    // the agentbus service on the port agentbus listens on, on all interfaces.
    let registration = Registration::from_config(&config);
    assert_eq!(
        registration.url,
        format!("http://agentbus:{}", config.appservice.bind.port())
    );
    assert!(config.appservice.bind.ip().is_unspecified());
}

#[test]
fn compose_nginx_mounts_the_files_the_config_includes_and_reaches_both_services() {
    let compose = compose();
    let nginx = service(&compose, "nginx");
    let toml = conduit_toml();
    let config = deploy_config();
    let site = read("nginx/agentbus.conf");
    // Includes are relative to /etc/nginx, the image's configuration directory.
    for include in ["agentbus/upstreams.conf", "agentbus/locations.conf"] {
        assert!(
            site.contains(&format!("include {include};")),
            "nginx/agentbus.conf includes {include}"
        );
        assert!(
            mounts(nginx)
                .iter()
                .any(|(_, target)| *target == format!("/etc/nginx/{include}")),
            "the nginx service mounts /etc/nginx/{include}"
        );
    }
    assert_eq!(
        target_of(nginx, "nginx", "./nginx/compose/upstreams.conf"),
        "/etc/nginx/agentbus/upstreams.conf"
    );
    assert_eq!(
        target_of(nginx, "nginx", "./nginx/agentbus/locations.conf"),
        "/etc/nginx/agentbus/locations.conf"
    );
    let upstreams = read("nginx/compose/upstreams.conf");
    let conduit_port = conduit_global(&toml, "port").as_integer().unwrap();
    for server in [
        format!("server conduit:{conduit_port};"),
        format!("server agentbus:{};", config.appservice.bind.port()),
    ] {
        assert!(
            upstreams.contains(&server),
            "nginx/compose/upstreams.conf has {server}"
        );
    }
}

// -------------------------------------------------------------------- systemd --

/// `Key=value` lines of the unit (comments and sections left out).
fn unit_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('['))
        .filter_map(|line| line.split_once('='))
        .collect()
}

#[test]
fn the_systemd_unit_is_hardened_and_starts_agentbus_serve() {
    let unit = read("deploy/agentbus.service");
    let settings = unit_settings(&unit);
    let value = |key: &str| {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("deploy/agentbus.service has no {key}="))
    };
    for (key, wanted) in [
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("Restart", "on-failure"),
        ("User", "agentbus"),
    ] {
        assert_eq!(value(key), wanted, "deploy/agentbus.service {key}=");
    }
    // The one writable path is the data directory systemd creates for the service.
    assert_eq!(
        value("ReadWritePaths"),
        format!("/var/lib/{}", value("StateDirectory"))
    );

    // ExecStart's arguments are ones the binary accepts.
    let exec = value("ExecStart");
    let mut args = exec.split_whitespace();
    assert_eq!(args.next(), Some("/usr/local/bin/agentbus"));
    let args: Vec<&str> = args.collect();
    assert_eq!(args.last(), Some(&"serve"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "agentbus {} --help: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// systemd's own check of the unit: unknown keys, bad values, a missing binary. The unit
/// names the installed path, so the check runs on a copy naming the binary just built.
#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("skipped: systemd-analyze is not installed (Debian package systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("agentbus.service");
    std::fs::write(
        &unit,
        read("deploy/agentbus.service")
            .replace("/usr/local/bin/agentbus", env!("CARGO_BIN_EXE_agentbus")),
    )
    .unwrap();
    let output = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify deploy/agentbus.service:\n{said}{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .ok_or(())
}
