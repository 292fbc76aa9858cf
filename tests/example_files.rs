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
