//! `intracom doctor`.

use std::sync::Arc;

use intracom::Config;

use super::open;
use crate::output::{fail, Outcome};

pub(crate) async fn doctor(config: &Config) -> Outcome {
    let bus = open(config, "doctor").await?;
    let medium = Arc::clone(bus.medium());
    let Some(diagnosis) = medium.diagnosis() else {
        bus.shutdown().await;
        return Err(fail(
            "doctor checks a MongoDB deployment",
            "for an MQTT broker, `intracom stats` shows what the broker tells",
        ));
    };
    out!(
        "checking {} / {}",
        config.db.redacted_uri(),
        config.db.database
    );
    let checks = diagnosis.checks().await;
    bus.shutdown().await;
    let mut failed = 0;
    for check in &checks {
        out!(
            "{} {:<16} {}",
            if check.ok { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        );
        if let Some(fix) = &check.fix {
            out!("     {:<16} fix: {fix}", "");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(fail(
            format!("{failed} check(s) failed"),
            "apply the fixes above, then run `intracom doctor` again",
        ));
    }
    out!("all {} checks passed", checks.len());
    Ok(())
}
