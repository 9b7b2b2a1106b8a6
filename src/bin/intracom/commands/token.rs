//! `intracom token`.

use clap::Subcommand;

use crate::output::Outcome;

#[cfg(feature = "gateway")]
#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a random token; prints it, then the line to add to the tokens file (only
    /// the hash is kept there).
    New {
        /// The service the token acts as.
        #[arg(long, required_unless_present = "admin")]
        service: Option<String>,
        /// Give the token the admin role (queues, dead letters, stores, stats).
        #[arg(long)]
        admin: bool,
    },
}

#[cfg(feature = "gateway")]
pub(crate) fn token(command: TokenCommand) -> Outcome {
    use intracom::gateway::{Identity, Tokens};
    match command {
        TokenCommand::New { service, admin } => {
            let identity = match service {
                Some(service) => {
                    let identity = Identity::service(service);
                    if admin {
                        identity.and_admin()
                    } else {
                        identity
                    }
                }
                None => Identity::admin(),
            };
            let token = Tokens::generate()?;
            let line = Tokens::line(&token, &identity);
            Tokens::parse(&line)?;
            out!("{token}");
            out!("# add this line to the tokens file (it keeps the hash only):");
            out!("{line}");
        }
    }
    Ok(())
}
