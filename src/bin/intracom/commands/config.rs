//! `intracom config`.

use intracom::Config;

use crate::output::Outcome;

/// Prints the configuration as the library resolves it, secrets masked
/// ([`Config::to_properties`]).
pub(crate) fn print_config(config: &Config) -> Outcome {
    for line in config.to_properties().lines() {
        out!("{line}");
    }
    Ok(())
}
